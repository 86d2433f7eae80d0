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
    """Scratch of the in-place program: one chunk of gated w13 or its scales (else 0)."""
    if not spec.gated:
        return 0
    shapes = spec.shapes(padded=True)
    return max(c * math.prod(s[1:]) for c, s in zip(chunks[:2], shapes[:2]))


def layer_program(spec: LayerSpec, *, chunks, pad):
    """The pure function of the four (padded by ``pad``) arrays that prepares one layer.

    ``chunks=None``: out of place, one pass per array. Otherwise in place: outputs
    aliased to the inputs (reused when donated), with one chunk of scratch.
    """
    from jax.experimental.buffer_callback import buffer_callback

    from torch_bridge._bridge import on_xla_stream, torch_bytes

    from . import _triton_kernels as k

    in_place = chunks is not None
    extra = scratch_bytes(spec, chunks) if in_place else 0
    # Every launch is planned here, at trace time; the callback only launches.
    steps = k.layer_steps(spec.shapes(padded=True), gated=spec.gated, chunks=chunks)

    def callback(ctx, outs, *ins):
        with on_xla_stream(ctx, outs[0]) as device:
            buffers = [torch_bytes(b) for b in (outs if in_place else (*ins, *outs))]
            k.run_steps(steps, buffers, stream=None if device is None else ctx.stream,
                        device=device)

    def program(*arrays):
        arrays = [p(x) for p, x in zip(pad, arrays)]
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]
        if extra:
            shapes.append(jax.ShapeDtypeStruct((extra,), jnp.uint8))
        call = buffer_callback(callback, shapes,
                               input_output_aliases={i: i for i in range(4)} if in_place else None)
        return tuple(call(*arrays)[:4])

    return program
