"""Backends: pure XLA, Triton kernels, or flashinfer's swizzle kernel through torch_bridge.

* ``"xla"``: reshapes and transposes (Pallas row kernels for the weights on CUDA).
* ``"triton"``: every array moved by the Triton kernels of ``_triton`` (CUDA).
* ``"flashinfer"``: rows in XLA, the 128x4 scale swizzle by flashinfer's
  ``block_scale_interleave``.

The last two run inside the jitted program through
``jax.experimental.buffer_callback`` on XLA's stream, writing straight into the
(donated) buffers. torch, triton and flashinfer are imported only when asked for.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
from torch_bridge._bridge import INSTALL_HINT

from .triton import program as _triton

BACKENDS = ("auto", "xla", "triton", "flashinfer")

# Whether "auto" may pick flashinfer. Measured on an H100 and an H200
# (benchmarks/NOTES.md): XLA's fused rows + swizzle transpose is faster than
# the row permutation followed by flashinfer's kernel (which moves one byte per
# thread), so "auto" stays on XLA. Set from measurements, not from availability.
AUTO_PICKS_FLASHINFER = False
# Whether "auto" may pick the Triton kernels on CUDA (when torch and triton import);
# the caller's ``auto_triton`` then says whether they win for the layer
# (_prepare.auto_takes_triton; measured: benchmarks/NOTES.md).
AUTO_PICKS_TRITON = True


def flashinfer_missing() -> str | None:
    """Why the flashinfer backend cannot run in this process (None when it can)."""
    # torch stays needed with jax-tvm-ffi too: flashinfer imports it and compiles with it.
    for module, what in (("torch", "torch"), ("flashinfer", "flashinfer-python")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed; {INSTALL_HINT}"
    return None


def _devices(arrays):
    out = set()
    for x in arrays:
        if isinstance(x, jax.Array) and not x.is_deleted():
            out |= set(x.devices())
    return out


def _on_cuda(arrays) -> bool:
    if not all(isinstance(x, jax.Array) for x in arrays):
        return False
    devices = _devices(arrays)
    return bool(devices) and all(
        d.platform == "gpu" and "rocm" not in str(getattr(d.client, "platform_version", "")).lower()
        for d in devices)


def _where(arrays) -> str:
    return ", ".join(sorted({d.platform for d in _devices(arrays)}) or ["not jax arrays"])


def _on_cpu(arrays) -> bool:
    devices = _devices(arrays)
    return bool(devices) and all(d.platform == "cpu" for d in devices)


def resolve_backend(backend: str, arrays, *, inverse: bool = False,
                    auto_triton: bool = True) -> str:
    """The backend that will run (``"xla"``, ``"triton"`` or ``"flashinfer"``).

    Checks the name, and for ``"triton"`` / ``"flashinfer"`` that their packages
    import and the arrays live on a CUDA device (Triton: or on CPU under
    ``TRITON_INTERPRET=1``), before anything is donated. The inverse has no
    kernel: ``unprepare`` always runs on XLA. ``auto_triton``: whether ``"auto"``
    takes Triton for this layer where it can run.

    Raises
    ------
    ValueError
        An unknown backend, or a kernel backend for arrays not on a CUDA device.
    ImportError
        A kernel backend without its packages installed (says what to install).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if inverse or backend == "xla":
        return "xla"
    if backend == "auto":
        if AUTO_PICKS_TRITON and auto_triton and _on_cuda(arrays) and _triton.missing() is None:
            return "triton"
        if AUTO_PICKS_FLASHINFER and _on_cuda(arrays) and flashinfer_missing() is None:
            return "flashinfer"
        return "xla"
    if backend == "triton":
        missing = _triton.missing()
        if missing:
            raise ImportError(f'backend="triton": {missing}; or use backend="xla"')
        if not (_on_cuda(arrays) or (_on_cpu(arrays) and _triton.interpreting())):
            raise ValueError(
                f'backend="triton" needs the arrays on a CUDA GPU; they are on {_where(arrays)}. '
                'Use backend="xla" (any platform) or jax.device_put them to a CUDA device first'
            )
        return "triton"
    missing = flashinfer_missing()
    if missing:
        raise ImportError(f'backend="flashinfer": {missing}; or use backend="xla"')
    if not _on_cuda(arrays):
        raise ValueError(
            'backend="flashinfer" needs the arrays on a CUDA GPU (flashinfer\'s kernel is '
            f"CUDA only); they are on {_where(arrays)}. Use backend=\"xla\" (any platform) "
            "or jax.device_put them to a CUDA device first"
        )
    for d in _devices(arrays):
        _warm_up(d)
    return "flashinfer"


@functools.lru_cache(maxsize=None)
def _warm_up(device) -> None:
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


def scale_writer(backend: str, rows):
    """``(fn, write)`` for a scale array: ``rows`` (XLA) then the backend's swizzle.

    ``fn(x)`` returns the result as a new array; ``write(buf, start, block)``
    writes the result of ``block`` into ``buf`` from expert ``start`` on (``start``
    a Python int) and returns the updated ``buf``: in place when ``buf`` is donated.
    The kernel is an XLA FFI call when jax-tvm-ffi is installed (``_via_ffi``),
    else a ``buffer_callback`` through torch_bridge.
    """
    assert backend == "flashinfer", backend
    if _via_ffi():
        from ..kernels._interleave import block_scale_interleave
    else:
        from torch_bridge import block_scale_interleave

    def fn(x):
        return block_scale_interleave(rows(x)).reshape(x.shape)

    def write(buf, start, block):
        return block_scale_interleave(rows(block), out=buf, start=start)

    return fn, write
