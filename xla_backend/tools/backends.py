"""The ways the tools (bench, demo) run a training step, named once for both."""

BACKENDS = ("eager", "inductor", "lazy", "openxla", "syncfree_xla")
XLA_BACKENDS = frozenset({"lazy", "openxla", "syncfree_xla"})
BACKEND_DOCS = {
    "eager": "plain PyTorch on the CPU",
    "inductor": "torch.compile(backend='inductor') on the CPU",
    "lazy": "the step uncompiled on XLA tensors, torch_xla.sync() after each step",
    "openxla": "torch.compile(backend='openxla'), torch_xla's own backend",
    "syncfree_xla": "torch.compile(backend='syncfree_xla'), this project",
}


__all__ = ["BACKENDS", "BACKEND_DOCS", "XLA_BACKENDS"]
