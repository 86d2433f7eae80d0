"""``backend="flashinfer"``: the rows in XLA (``xla``), the 128x4 scale swizzle by
flashinfer's ``block_scale_interleave`` kernel, writing straight into the (donated)
buffers. The kernel is an XLA FFI call where jax-tvm-ffi is installed, else a
``jax.experimental.buffer_callback`` through torch_bridge, on XLA's stream either way.
torch and flashinfer are imported only when asked for."""

from __future__ import annotations

import functools

import jax
from torch_bridge._bridge import INSTALL_HINT

from ..layout import steps
from ..layout.spec import LayerSpec
from . import xla
from .installed import installed


def missing() -> str | None:
    """Why the flashinfer backend cannot run in this process (None when it can)."""
    # torch stays needed with jax-tvm-ffi too: flashinfer imports it and compiles with it.
    for module, what in (("torch", "torch"), ("flashinfer", "flashinfer-python")):
        if not installed(module):
            return f"{what} is not installed; {INSTALL_HINT}"
    return None


@functools.lru_cache(maxsize=None)
def warm_up(device) -> None:
    """Load (JIT-compile on first use, ~40 s) flashinfer's module outside any jit, and
    register its FFI targets when jax-tvm-ffi is there."""
    if _via_ffi():
        from ..kernels import _interleave

        _interleave.ensure(device.platform, device)
        return
    import jax.numpy as jnp

    import torch_bridge

    tiny = jax.device_put(jnp.arange(512, dtype=jnp.uint8).reshape(1, 128, 4), device)
    jax.block_until_ready(torch_bridge.block_scale_interleave(tiny))


def _via_ffi() -> bool:
    """Whether the flashinfer backend calls its kernel as an XLA FFI target (jax-tvm-ffi)
    rather than from a ``buffer_callback`` through torch (the fallback). Measured on an
    H200 (benchmarks/tvm_ffi_route.py): same bytes, lower fixed cost per call."""
    from torch_bridge import _bridge

    from ..kernels import _ffi

    # A stand-in for torch_bridge's kernel (the CPU plumbing tests) keeps its route.
    return _bridge._kernel is None and _ffi.missing() is None


def scale_writer(rows):
    """``(fn, write)`` for a scale array: ``rows`` (XLA) then flashinfer's swizzle.

    ``fn(x)`` returns the result as a new array; ``write(buf, start, block)``
    writes the result of ``block`` into ``buf`` from expert ``start`` on (``start``
    a Python int) and returns the updated ``buf``: in place when ``buf`` is donated.
    The kernel is an XLA FFI call when jax-tvm-ffi is installed (``_via_ffi``),
    else a ``buffer_callback`` through torch_bridge.
    """
    if _via_ffi():
        from ..kernels._interleave import block_scale_interleave
    else:
        from torch_bridge import block_scale_interleave

    def fn(x):
        return block_scale_interleave(rows(x)).reshape(x.shape)

    def write(buf, start, block):
        return block_scale_interleave(rows(block), out=buf, start=start)

    return fn, write


def transforms(spec: LayerSpec, *, pallas: bool = False, fuse_scales: bool = True):
    """Per array ``(fn, write)`` (as ``xla.transforms``) that prepares ``spec``: the
    weights as ``xla``, each scale array's rows by XLA, then the kernel's swizzle (it must
    see the rows in order). No inverse: unprepare runs on ``xla``."""
    out = list(xla.transforms(spec, inverse=False, pallas=pallas, fuse_scales=fuse_scales))
    pads, rows = steps.pads(spec), steps.moves(spec, fuse=False)
    for k in (1, 3):
        fn, write = scale_writer(steps.apply(rows[k][:1], False))
        out[k] = (steps.then(pads[k], fn), write)
    return tuple(out)
