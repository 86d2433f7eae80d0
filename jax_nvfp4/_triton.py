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


# Gated w13 moves in place in one pass where one program holds all of an expert's rows
# for a block of at least WHOLE_MIN_UNITS four-byte columns, TILE_WHOLE units in all:
# 2I a power of two up to 1024 (TP shards). Larger, its rows go through scratch.
TILE_WHOLE = 16384
WHOLE_MIN_UNITS = 16


def w13_in_one_pass(spec: LayerSpec) -> bool:
    """Whether the in-place program moves gated w13 in one pass (no scratch for it)."""
    rows = spec.shapes(padded=True)[0][1]
    return spec.gated and rows & (rows - 1) == 0 and TILE_WHOLE // rows >= WHOLE_MIN_UNITS


def scratch_bytes(spec: LayerSpec, chunks) -> int:
    """Scratch of the in-place program: a chunk of gated w13's scales, and of w13 itself
    unless it moves in one pass (0 when not gated: every group is its own source).
    Chunks (experts) are ``chunks[1]`` for the scales alone, else ``chunks[0]``."""
    if not spec.gated or chunks is None:
        return 0
    per = [math.prod(s[1:]) for s in spec.shapes(padded=True)[:2]]
    if w13_in_one_pass(spec):
        return min(chunks[1], spec.experts) * per[1]
    return min(chunks[0], spec.experts) * (per[0] + per[1])


# Our own prototype of PyCapsule_GetPointer (not ctypes.pythonapi's shared one, whose
# restype and argtypes other code may rely on).
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def _pointer(buffer) -> int:
    """The device address of a ``buffer_callback`` buffer, read from its DLPack capsule
    (no torch tensor: that costs tens of microseconds per buffer, float8 included)."""
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
    one_pass = w13_in_one_pass(spec)
    launches = k.plan(k.layer_launches(
        spec.shapes(padded=True), gated=spec.gated, w13_one_pass=one_pass,
        chunk=None if not in_place else chunks[1] if one_pass else chunks[0]))

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
