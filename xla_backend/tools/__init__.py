"""Tools built on the backend: ``explain``, ``bench``, the ``syncfree-xla`` command, the
demo and its reference workloads. Nothing in the backend's stages imports them.
"""
