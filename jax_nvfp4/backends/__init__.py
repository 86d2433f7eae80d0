"""Backends that run a layer's steps on a device (xla, flashinfer, triton), and select.py, which picks one."""
