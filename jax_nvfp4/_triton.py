"""``backend="triton"``: the whole layer moved by Triton kernels, inside the jitted program.

Why Triton kernels rather than XLA (benchmarks/NOTES.md, H200): XLA's GPU
emitters move uint8 one byte per thread, about a third of the copy bandwidth,
and Pallas' Triton lowering (deprecated in jax 0.11) indexes arrays of 2-4 GiB
in int32, so DeepSeek-V3's 3.76 GB w13 came out wrong there. These kernels move
4-byte units with 64-bit offsets, fuse rows and swizzle for the scales, and work
in place in one pass wherever a group of rows is its own source (everything but
gated w13 and its scales, which go through one chunk of scratch).

They run through ``jax.experimental.buffer_callback``: on XLA's own CUDA stream,
on XLA's buffers (aliased to the donated inputs), with the scratch an XLA
temporary. The kernels are compiled by the Triton that ships with CUDA builds
of torch. On CPU they run only in Triton's interpreter (``TRITON_INTERPRET=1``,
which the tests set), slowly; that is for tests, not use.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os

import jax
import jax.numpy as jnp

from ._spec import LayerSpec

INSTALL_HINT = 'pip install "jax-nvfp4[triton]" (a CUDA build of torch, which brings triton)'


def missing() -> str | None:
    """Why the triton backend cannot run in this process (None when it can)."""
    for module in ("torch", "triton"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed; {INSTALL_HINT}"
    return None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def scratch_bytes(spec: LayerSpec, chunks) -> int:
    """Scratch of the in-place program: ``chunks[0]`` experts of gated w13 and of its
    scales (0 when not gated: every group is then its own source)."""
    if not spec.gated or chunks is None:
        return 0
    shapes = spec.shapes(padded=True)
    return min(chunks[0], spec.experts) * sum(math.prod(s[1:]) for s in shapes[:2])


_capsule_pointer = None


def _pointer(buffer) -> int:
    """The device address of a ``buffer_callback`` buffer, read from its DLPack capsule
    (no torch tensor: that costs tens of microseconds per buffer, float8 included)."""
    global _capsule_pointer
    if _capsule_pointer is None:
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        _capsule_pointer = get
    # An unconsumed "dltensor" capsule frees its DLManagedTensor (not the buffer) when
    # collected. DLTensor: data, device (8 bytes), ndim, dtype, shape, strides, byte_offset.
    try:
        tensor = _capsule_pointer(buffer.__dlpack__(), b"dltensor")
    except Exception:  # noqa: BLE001 - another capsule kind: ask torch
        from torch_bridge._bridge import torch_bytes
        return torch_bytes(buffer).data_ptr()
    data = ctypes.c_uint64.from_address(tensor).value
    return data + ctypes.c_uint64.from_address(tensor + 40).value


def layer_program(spec: LayerSpec, *, chunks, pad):
    """The pure function of the four (padded by ``pad``) arrays that prepares one layer.

    ``chunks=None``: out of place, one pass per array. Otherwise in place: outputs
    aliased to the inputs (reused when donated), with one chunk of scratch.
    """
    import torch
    from jax.experimental.buffer_callback import buffer_callback

    from torch_bridge._bridge import torch_bytes

    from . import _triton_kernels as k

    in_place = chunks is not None
    extra = scratch_bytes(spec, chunks) if in_place else 0
    # Every launch is planned here, at trace time; the callback only launches.
    launches = k.plan(k.layer_launches(spec.shapes(padded=True), gated=spec.gated,
                                       chunk=chunks[0] if in_place else None))

    def callback(ctx, outs, *ins):
        buffers = outs if in_place else (*ins, *outs)
        kind, index = outs[0].__dlpack_device__()
        tensors = lambda: [torch_bytes(b) for b in buffers]  # noqa: E731
        if kind == 2:  # kDLCUDA: XLA's stream and device, raw pointers
            with torch.cuda.device(index):
                k.run(launches, tensors=tensors, pointers=[_pointer(b) for b in buffers],
                      stream=ctx.stream, device=index)
        else:  # Triton's interpreter
            k.run(launches, tensors=tensors)

    def program(*arrays):
        arrays = [p(x) for p, x in zip(pad, arrays)]
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]
        if extra:
            shapes.append(jax.ShapeDtypeStruct((extra,), jnp.uint8))
        call = buffer_callback(callback, shapes,
                               input_output_aliases={i: i for i in range(4)} if in_place else None)
        return tuple(call(*arrays)[:4])

    return program
