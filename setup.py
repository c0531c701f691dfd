"""Distribution ``syncfree-xla``: the syncfree_xla torch.compile backend."""

from setuptools import find_packages, setup

setup(
    name="syncfree-xla",
    version="0.1.0",
    description="A torch.compile backend that trains on XLA without host syncs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["xla_backend", "xla_backend.*", "passes", "passes.*"]),
    install_requires=[
        "torch==2.9.0",
        "torch_xla==2.9.0",
    ],
    extras_require={
        # Pinned to versions the suite passes with: a new linter or test-runner release
        # must not turn CI red overnight. Raise them on purpose, with a green run.
        "dev": [
            "pytest==9.2.0",
            "pytest-benchmark==5.3.1",
            "pytest-xdist==3.8.0",  # make test runs the suite on every core
            "hypothesis==6.170.17",
            "ruff==0.17.6",
            "matplotlib==3.11.2",  # syncfree-xla bench --plot
            "torchvision==0.24.0",
            "transformers==4.57.6",
        ],
    },
    entry_points={
        "torch_dynamo_backends": ["syncfree_xla = xla_backend.backend:syncfree_xla"],
        # run by `import torch`: PJRT_DEVICE and XLA_FLAGS set before torch_xla starts
        "torch.backends": ["syncfree_xla = xla_backend.device:autoload"],
        "console_scripts": ["syncfree-xla = xla_backend.tools.cli:main"],
        "pytest11": ["syncfree_xla = xla_backend.tools.pytest_plugin"],
    },
)
