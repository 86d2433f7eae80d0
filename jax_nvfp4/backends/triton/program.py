"""``backend="triton"``: the whole layer moved by Triton kernels, inside the jitted program.

Why Triton kernels rather than XLA (benchmarks/DESIGN-RECORD.md, H200): XLA's GPU
emitters move uint8 one byte per thread, about a third of the copy bandwidth,
and Pallas' Triton lowering (deprecated in jax 0.11) indexes arrays of 2-4 GiB
in int32, so DeepSeek-V3's 3.76 GB w13 came out wrong there. These kernels move
4-byte units with 64-bit offsets, fuse rows and swizzle for the scales, and work
in place in one pass wherever a group of rows is its own source (everything but
gated w13 and its scales), gated w13 in one pass where a program holds an expert's rows
(2I up to 2048) or where 2I is a larger power of two (by the cycles of its row
permutation), else through one chunk of scratch, as its scales always are.

They are launched by XLA itself where jax-triton imports (``route() == "xla"``:
jaxlib's ``triton_kernel_call`` custom call, one per launch, no Python at call time),
else from a ``jax.experimental.buffer_callback`` (``"callback"``). Either way on
XLA's own CUDA stream, on XLA's buffers (aliased to the donated inputs). The kernels are compiled by the Triton that ships with CUDA builds
of torch. On CPU they run only in Triton's interpreter (``TRITON_INTERPRET=1``,
which the tests set), slowly; that is for tests, not use.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp

from ...layout import steps
from ...layout.spec import LayerSpec
from ...options import Options, check_route, current
from ..installed import installed
from .tiles import (cycle_table, scratch_bytes, w13_by_cycles, w13_in_one_pass, w13_rows,
                    w13_through_scratch)

INSTALL_HINT = 'pip install "jax-nvfp4[triton]" (a CUDA build of torch, which brings triton)'


def missing() -> str | None:
    """Why the triton backend cannot run in this process (None when it can)."""
    for module in ("torch", "triton"):
        if not installed(module):
            return f"{module} is not installed; {INSTALL_HINT}"
    return None


def route(options: Options | None = None, *, interpret: bool | None = None) -> str:
    """``"xla"`` (jax-triton's custom call) or ``"callback"`` (``buffer_callback``): the
    knob ``triton_route`` (``"auto"``: through XLA where jax-triton imports, else from a
    buffer_callback). Measured on an H200 (benchmarks/DESIGN-RECORD.md): the same kernels, the XLA
    route without the callback's fixed host cost. ``interpret``: :func:`interpreting`, where
    the caller has just read it (an environment read costs about a microsecond)."""
    chosen = check_route((options or current()).triton_route)
    if chosen == "auto":
        interpret = interpreting() if interpret is None else interpret
        return "xla" if not interpret and jax_triton_missing() is None else "callback"
    return chosen


@functools.lru_cache(maxsize=1)
def jax_triton_missing() -> str | None:
    """Why jax-triton cannot launch the kernels here (None when it can). Asked once per
    process (``route()`` runs on every call)."""
    if importlib.util.find_spec("jax_triton") is None:
        return "jax-triton is not installed (pip install jax-triton)"
    try:
        _jax_triton()
    except Exception as e:  # noqa: BLE001 - a version mismatch raises various types
        return f"jax-triton does not import ({type(e).__name__}: {e})"
    return None


def _jax_triton():
    """``import jax_triton``, keeping ``TRITON_CACHE_DIR`` as it was: jax-triton 0.3.1 sets
    it to "" at import, after which every launch through Triton's own runtime in this
    process fails ("Could not create or locate cache dir"; seen on an H200: the
    buffer_callback route, torch's Triton kernels). jax-triton's own compile path does not
    use Triton's file cache."""
    import sys
    if "jax_triton" in sys.modules:
        return sys.modules["jax_triton"]
    saved = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    return jax_triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def layer_program(spec: LayerSpec, *, chunks, via: str = "callback"):
    """The pure function of the four arrays that prepares one layer. A padded layer moves
    out of place in one pass, its padding written as zeros by the kernels (by XLA first
    for an array whose rows are not whole 4-byte units, e.g. I/16 scale bytes not a
    multiple of 4).

    ``chunks=None``: out of place, one pass per array. Otherwise in place: outputs
    aliased to the inputs (reused when donated), with one chunk of scratch.
    ``via``: ``"xla"`` (jax-triton's custom call, CUDA only) or ``"callback"``.
    """
    if via == "xla":
        return _xla_program(spec, chunks=chunks)
    from jax.experimental.buffer_callback import buffer_callback

    in_place = chunks is not None
    extra = scratch_bytes(spec, chunks) if in_place else 0
    table = _cycles(spec) if in_place else None
    # Every launch is planned here, at trace time; the callback only launches.
    callback = _callback(_plan(spec, chunks if in_place else None), in_place=in_place)
    pads = _pads(spec)

    def program(*arrays):
        arrays = [p(x) for p, x in zip(pads, arrays)]
        shapes = _results(spec, arrays)
        if extra:
            shapes.append(jax.ShapeDtypeStruct((extra,), jnp.uint8))
        call = buffer_callback(callback, shapes,
                               input_output_aliases={i: i for i in range(4)} if in_place else None)
        return tuple(call(*arrays, *(() if table is None else (jnp.asarray(table),)))[:4])

    return program


def array_programs(spec: LayerSpec, *, via: str = "callback"):
    """Out of place, one function per array: result ``k`` of ``layer_program(spec,
    chunks=None)`` from input ``k`` alone (the same launch, split by array). For a padded
    layer prepared donated one array after another, each input freed before the next
    result is allocated (``transform``)."""
    import copy

    from . import kernels as k

    (launch,) = _plan(spec, None)
    out = []
    for idx, (segment, pad) in enumerate(zip(launch.segments, _pads(spec))):
        segment = copy.copy(segment)
        segment.src, segment.dst = 0, 1  # the call's two buffers: its source, its result
        out.append(_one_array(spec.shapes(padded=True)[idx], k.Launch([segment]), pad, via))
    return tuple(out)


def _one_array(shape, launch, pad, via):
    if via == "xla":
        jt = _jax_triton()

        from . import kernels as k

        offsets, consts = k.xla_call_args(launch, [0, 1])

        def program(x):
            result = jax.ShapeDtypeStruct(shape, x.dtype)
            return jt.triton_call(*offsets, pad(x), kernel=k.XLA_KERNELS[2], out_shape=[result],
                                  grid=launch.grid, num_warps=launch.warps,
                                  name="jax_nvfp4_array", **consts)[0]
        return program
    from jax.experimental.buffer_callback import buffer_callback

    callback = _callback([launch], in_place=False)

    def program(x):
        return buffer_callback(callback, [jax.ShapeDtypeStruct(shape, x.dtype)])(pad(x))[0]
    return program


def _callback(launches, *, in_place: bool):
    """The ``buffer_callback`` that runs planned ``launches``: on the call's results (in
    place) or on its operands then results."""
    import torch

    from torch_bridge._bridge import torch_bytes

    from . import kernels as k

    def callback(ctx, outs, *ins):
        # In place: the results (arrays, scratch), then the cycle table where there is one.
        buffers = (*outs, *ins[4:]) if in_place else (*ins, *outs)
        kind, index = outs[0].__dlpack_device__()
        tensors = lambda: [torch_bytes(b) for b in buffers]  # noqa: E731
        if kind == 2:  # kDLCUDA: XLA's stream and device, raw pointers
            with torch.cuda.device(index):
                k.run(launches, tensors=tensors, pointers=[_pointer(b) for b in buffers],
                      stream=ctx.stream, device=index)
        else:  # Triton's interpreter
            k.run(launches, tensors=tensors)
    return callback


def _read_unpadded(spec: LayerSpec) -> tuple[bool, ...]:
    """Per array, whether the kernels read it unpadded and write its padding as zeros on
    the way (one pass): where it is padded and its rows are whole 4-byte units (else XLA
    pads it first). Only out of place: a padded layer never moves in place."""
    return tuple(raw != padded and raw[2] % 4 == 0
                 for raw, padded in zip(spec.shapes(padded=False), spec.shapes(padded=True)))


def _pads(spec: LayerSpec):
    """What XLA does to each array before the kernels: pad it, unless they read it unpadded."""
    return tuple((lambda x: x) if unpadded else pad
                 for unpadded, pad in zip(_read_unpadded(spec), steps.pads(spec)))


def _results(spec: LayerSpec, arrays):
    """The four results: the padded shapes, the arrays' dtypes."""
    return [jax.ShapeDtypeStruct(s, x.dtype) for s, x in zip(spec.shapes(padded=True), arrays)]


def _cycles(spec: LayerSpec):
    """The cycle table of gated w13 in place (``tiles.cycle_table``), or None where w13
    moves otherwise."""
    return cycle_table(w13_rows(spec)) if w13_by_cycles(spec) else None


def _plan(spec: LayerSpec, chunks):
    from . import kernels as k

    one_pass = w13_in_one_pass(spec)
    table = _cycles(spec) if chunks is not None else None
    sources = [raw if unpadded else padded for raw, padded, unpadded in zip(
        spec.shapes(padded=False), spec.shapes(padded=True), _read_unpadded(spec))]
    return k.plan(k.layer_launches(
        spec.shapes(padded=True), gated=spec.gated, w13_one_pass=one_pass,
        w13_cycles=0 if table is None else len(table),
        chunk=None if chunks is None else chunks[0] if w13_through_scratch(spec) else chunks[1],
        sources=sources))


def _xla_program(spec: LayerSpec, *, chunks):
    """:func:`layer_program` with each launch an XLA custom call (jax-triton): XLA launches
    the compiled kernels in its own executable, so a call costs no Python callback.

    The calls are chained through their results (each returns the arrays it may write,
    aliased to its operands), which orders them on the stream. In place, the first call
    also returns the scratch (an XLA buffer that later calls take and give back).
    """
    jt = _jax_triton()

    from . import kernels as k

    in_place = chunks is not None
    extra = scratch_bytes(spec, chunks) if in_place else 0
    table = _cycles(spec) if in_place else None
    launches = _plan(spec, chunks)
    pads = _pads(spec)

    def call(launch, operands, results, aliases, places):
        offsets, consts = k.xla_call_args(launch, places)
        out = jt.triton_call(*offsets, *operands, kernel=k.XLA_KERNELS[len(operands) + len(results)],
                             out_shape=results, grid=launch.grid, num_warps=launch.warps,
                             input_output_aliases=aliases, name="jax_nvfp4_layer", **consts)
        return list(out)

    def program(*arrays):
        arrays = [p(x) for p, x in zip(pads, arrays)]
        shapes = _results(spec, arrays)
        if not in_place:  # one launch: buffers 0-3 the sources, 4-7 the results
            (launch,) = launches
            return tuple(call(launch, arrays, shapes, {}, list(range(8))))
        four = {i: i for i in range(4)}
        if not extra:  # one launch, every array its own source: results alias operands
            (launch,) = launches
            return tuple(call(launch, arrays, shapes, four, list(range(4))))
        scratch_shape = jax.ShapeDtypeStruct((extra,), jnp.uint8)
        if table is None:  # first call: operands 0-3, results 4-7 (aliased), 8 the scratch
            *arrays, scratch = call(launches[0], arrays, [*shapes, scratch_shape], four,
                                    [0, 1, 2, 3, 8])
        else:  # operands 0-3 and 4 the cycle table, results 5-8 (aliased), 9 the scratch
            *arrays, scratch = call(launches[0], [*arrays, jnp.asarray(table)],
                                    [*shapes, scratch_shape], four, [0, 1, 2, 3, 9, 4])
        for launch in launches[1:]:  # operands 0-4 (arrays, scratch), results aliased
            *arrays, scratch = call(launch, [*arrays, scratch], [*shapes, scratch_shape],
                                    {i: i for i in range(5)}, list(range(5)))
        return tuple(arrays)

    return program
