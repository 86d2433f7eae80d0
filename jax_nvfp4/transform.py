"""prepare_layer / unprepare_layer: one MoE layer to and from the TRT-LLM layout.

With donation the work runs in place: a loop over chunks of
experts (unrolled, or a ``lax.fori_loop``) reads one chunk, transforms it and writes it back with
``lax.dynamic_update_slice`` into the donated buffer, so the only extra
device memory is one chunk. Without donation it is one out-of-place
transform per array (fastest; the caller keeps the inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
from jax import lax
import numpy as np

from .layout import index as _layout
from .tree import marks as _marks, sharding as _sharding
from .backends.triton import program as _triton
from .layout.spec import (BLOCK, DEFAULT_HIDDEN_ALIGNMENT, NAMES, SCALE_DTYPE, LayerSpec,
                          check_arrays)

from .backends.select import resolve_backend, scale_writer

# Default scratch per chunk: a share of the layer (so the transient stays a few
# percent of it), at least MIN_CHUNK_BYTES (so small layers are not cut into
# many tiny steps), and never more than a share of the device's free memory.
LAYER_SHARE = 32
MIN_CHUNK_BYTES = 64 << 20
FREE_SHARE = 8
# How the in-place loop runs: unrolled (static offsets, one straight-line
# program) or a lax.fori_loop (one body, dynamic offsets). benchmarks/NOTES.md.
UNROLL = False
# Scales: row permutation and swizzle fused into one transpose, or two passes.
FUSE_SCALES = True
# Weights on CUDA: row permutations as Pallas kernels (16-byte accesses) rather
# than XLA transposes (one byte per thread). benchmarks/NOTES.md.
PALLAS = True

Transform = Callable[[jax.Array], jax.Array]


def _moves(spec: LayerSpec, fuse: bool):
    """Per array, the ``_layout.move`` steps from the checkpoint to the TRT-LLM layout.

    Sizes are those of the padded arrays the steps run on. With ``fuse`` each
    scale array is one transpose (rows and swizzle composed), else rows then swizzle.
    """
    (_, r1, k13w), (_, _, k13), (_, h, k2w), (_, _, k2) = spec.shapes(padded=True)
    rows13 = _layout.gated_rows_move if spec.gated else _layout.rows_move
    if fuse:
        sw13 = _layout.gated_rows_swizzle_move if spec.gated else _layout.rows_swizzle_move
        s13, s2 = [sw13(r1, k13)], [_layout.rows_swizzle_move(h, k2)]
    else:
        s13 = [rows13(r1, k13), _layout.swizzle_move(r1, k13)]
        s2 = [_layout.rows_move(h, k2), _layout.swizzle_move(h, k2)]
    return [rows13(r1, k13w)], s13, [_layout.rows_move(h, k2w)], s2


def _apply(moves, inverse: bool) -> Transform:
    if inverse:
        return lambda x: functools.reduce(lambda y, m: _layout.unmove(y, *m), moves[::-1], x)
    return lambda x: functools.reduce(lambda y, m: _layout.move(y, *m), moves, x)


def _pad(spec: LayerSpec) -> tuple[Transform, ...]:
    """Zero padding of I to ``spec.padded_i`` and of H to ``spec.padded_h`` (identity when
    none is needed), as vLLM: rows of each half of w13 and columns of w2 for I; columns of
    w13 and rows of w2 (and their scales) for H."""
    ip, hp = spec.padded_i, spec.padded_h
    if not spec.needs_padding:
        return (lambda x: x,) * 4
    if spec.gated:
        def rows13(x):
            return _layout.pad_gated_rows(x, ip)
    else:
        def rows13(x):
            return _layout.pad_rows(x, ip)
    return (lambda x: _layout.pad_cols(rows13(x), hp // 2),
            lambda x: _layout.pad_cols(rows13(x), hp // BLOCK),
            lambda x: _layout.pad_rows(_layout.pad_cols(x, ip // 2), hp),
            lambda x: _layout.pad_rows(_layout.pad_cols(x, ip // BLOCK), hp))


def _crop(spec: LayerSpec, crop) -> tuple[Transform, ...]:
    """Inverse of :func:`_pad`: prepared (unpadded) arrays of ``spec`` cut back to the valid
    ``crop = (H, I)`` (per device); identity for ``None``."""
    if crop is None:
        return (lambda x: x,) * 4
    h, i = crop
    rows13 = ((lambda x: _layout.crop_gated_rows(x, i)) if spec.gated
              else (lambda x: _layout.crop_rows(x, i)))
    return (lambda x: _layout.crop_cols(rows13(x), h // 2),
            lambda x: _layout.crop_cols(rows13(x), h // BLOCK),
            lambda x: _layout.crop_cols(_layout.crop_rows(x, h), i // 2),
            lambda x: _layout.crop_cols(_layout.crop_rows(x, h), i // BLOCK))


def _then(f: Transform, g: Transform) -> Transform:
    return lambda x: g(f(x))


def _pallas_rows(view, perm, pad: Transform):
    """``(fn, write)`` of a row move as Pallas kernels (see ``_pallas``)."""
    from .backends import pallas as _pallas

    def fn(x):
        return _pallas.move_rows(pad(x), view, perm)

    def write(buf, start, block):
        moved = _pallas.move_rows(buf, view, perm, start=start, experts=block.shape[0])
        return _pallas.write_block(buf, moved, start)

    return fn, write


def _transforms(spec: LayerSpec, inverse: bool, backend: str, pallas: bool = False,
                crop=None):
    """Per array ``(fn, write)``: ``fn`` maps a block of experts to its result;
    ``write(buf, start, block)``, where not None, puts the result of ``block``
    into ``buf`` at expert ``start`` itself (the flashinfer kernel writes there).
    ``crop`` (inverse only): the valid ``(H, I)`` to cut the result back to.
    """
    moves = _moves(spec, FUSE_SCALES)
    pads = _pad(spec) if not inverse else (lambda x: x,) * 4
    if inverse:
        out = [(_then(_apply(m, True), c), None) for m, c in zip(moves, _crop(spec, crop))]
    else:
        out = [(_then(pad, _apply(m, False)), None) for pad, m in zip(pads, moves)]
    if pallas:
        from .backends import pallas as _pallas
        sizes = [int(np.prod(s)) for s in spec.shapes(padded=True)]
        for k in (0, 2):
            if not _pallas.fits(sizes[k]) or (inverse and crop is not None):
                continue
            (view, perm), = moves[k]
            if inverse:
                view, perm = tuple(view[p] for p in perm), tuple(int(i) for i in np.argsort(perm))
            out[k] = _pallas_rows(view, perm, pads[k])
        for k in (1, 3):  # scales: XLA's transpose into scratch, copied back by a kernel
            if _pallas.fits(sizes[k]):
                out[k] = (out[k][0], (lambda f: lambda buf, start, block:
                                      _pallas.write_block(buf, f(block), start))(out[k][0]))
    if inverse:
        return tuple(out)
    if backend != "xla":
        # Rows by XLA, then the kernel's swizzle (it must see the rows in order).
        rows = _moves(spec, fuse=False)
        for k in (1, 3):
            fn, write = scale_writer(backend, _apply(rows[k][:1], False))
            out[k] = (_then(pads[k], fn), write)
    return tuple(out)


def _chunked(x, fn: Transform, chunk: int, write=None):
    """``fn`` applied to ``x`` chunk by chunk of ``chunk`` experts, written back into ``x``.

    ``fn`` must keep the shape. Under donation XLA updates the buffer in place,
    so the scratch is one chunk. Each chunk reads the buffer the previous one
    wrote, so XLA runs them in order and reuses one scratch.
    """
    def step(start, size, buf):
        block = lax.dynamic_slice_in_dim(buf, start, size, axis=0)
        if write is not None:
            return write(buf, start, block)
        return lax.dynamic_update_slice_in_dim(buf, fn(block), start, axis=0)

    n, tail = divmod(x.shape[0], chunk)
    if UNROLL or write is not None:  # write needs static offsets
        for k in range(n):
            # The barrier keeps XLA from reading later chunks from the buffer
            # before this write (slice-of-update simplification), which would
            # keep every chunk's scratch alive at once.
            x = lax.optimization_barrier(step(k * chunk, chunk, x))
    elif n:
        x = lax.fori_loop(0, n, lambda k, buf: step(k * chunk, chunk, buf), x)
    if tail:
        x = step(n * chunk, tail, x)
    return x


def use_pallas(arrays) -> bool:
    """Whether the weights' rows move with the Pallas kernels: on CUDA GPUs, when enabled."""
    return PALLAS and all(isinstance(x, jax.Array) and
                          all(d.platform == "gpu" for d in x.devices()) for x in arrays)


# Layers from which the Triton kernels' lower device time pays for the buffer_callback's
# fixed cost (auto_takes_triton).
TRITON_MIN_BYTES = 256 << 20


def auto_takes_triton(spec: LayerSpec, *, donate: bool, inverse: bool = False,
                      pallas: bool = True) -> bool:
    """The rule of ``backend="auto"`` on CUDA: whether the Triton kernels prepare this
    (per-device) layer rather than XLA (with the Pallas row kernels where ``pallas``).
    ``resolve_backend`` then checks that Triton can run (CUDA arrays, torch and triton
    installed). Each branch names its measurement: one H200, one run,
    benchmarks/results/h200-2026-12-03-38b4dd417adf.json (wall ms, device ms in brackets;
    Triton launched from a buffer_callback), and call 7 (benchmarks/NOTES.md)."""
    if inverse:  # no kernel for the inverse
        return False
    if not pallas:  # XLA alone moves uint8 a byte per thread: a third of the copy bandwidth
        return True
    if needs_triton(spec):  # an array of 2 GiB or more stays off Pallas (int32 offsets):
        return True  # DeepSeek-V3 donated 6.31 [5.46] vs xla 9.66 [8.97], not 5.82 [3.12] vs 6.25 [5.72]
    large = spec.nbytes >= TRITON_MIN_BYTES
    if spec.needs_padding:  # out of place either way (the padding is a new buffer):
        # Nemotron-3-Nano (720 MB): triton 1.93 [1.33] vs xla 2.28 [1.69], donated or not;
        # Qwen3-30B TP8 (40 MB): xla 0.63 [0.134] vs triton 0.69 [0.142] donated.
        return large
    if donate and _triton.w13_in_one_pass(spec):  # in place, w13 in one pass (2I <= 1024):
        # DeepSeek-V3 TP8 (756 MB) donated: triton 4.17 [0.571] vs xla 4.85 [0.852];
        # tiny (8, 256, 128; 1.3 MiB): xla 3.15 [0.055] vs triton 4.00 [0.141].
        return large
    # Qwen3-30B-A3B (2I = 1536: w13 through scratch): donated [0.377] xla vs [0.394] triton,
    # not donated [0.202] vs [0.274]; DeepSeek-V3 TP8 not donated [0.449] vs [0.484].
    return False


def needs_triton(spec: LayerSpec) -> bool:
    """Whether an array of the layer is 2 GiB or more: too large for the Pallas row
    kernels, which leaves XLA moving it a byte per thread."""
    from .backends import pallas as _pallas
    return not all(_pallas.fits(math.prod(s)) for s in spec.shapes(padded=True))


def free_bytes(device) -> int | None:
    """Free memory on ``device`` (None where the platform does not say)."""
    try:
        stats = device.memory_stats() if device.platform != "cpu" else None
    except Exception:  # noqa: BLE001 - memory_stats is best effort on every platform
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))


def default_chunk_bytes(spec: LayerSpec, free: int | None = None) -> int:
    """The scratch budget used when ``chunk_bytes`` is None.

    ``1/LAYER_SHARE`` of the layer, at least ``MIN_CHUNK_BYTES``, at most
    ``1/FREE_SHARE`` of the device's free memory (when known).
    """
    budget = max(spec.nbytes // LAYER_SHARE, MIN_CHUNK_BYTES)
    if free is not None and free // FREE_SHARE < budget:
        # A power of two, so layers prepared as free memory shrinks share programs.
        budget = 1 << max(0, (free // FREE_SHARE).bit_length() - 1)
    return max(1, budget)


def experts_per_chunk(spec: LayerSpec, chunk_bytes: int | None,
                      free: int | None = None, *, w13_together: bool = False) -> tuple[int, ...]:
    """Experts per chunk for each of the four arrays, so a chunk is at most ``chunk_bytes``.

    Chunks are made as even as possible (``E = n * chunk + tail`` with a small tail).
    ``w13_together``: w13 and its scales share one chunk count, sized by their bytes
    together (the triton backend moves them through one scratch at once).
    """
    if chunk_bytes is None:
        budget = default_chunk_bytes(spec, free)
    elif isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, (int, np.integer)) \
            or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    else:
        budget = int(chunk_bytes)
    e = spec.experts
    per = [math.prod(shape[1:]) for shape in spec.shapes(padded=True)]
    if w13_together:
        per[0] = per[1] = per[0] + per[1]
    out = []
    for per_expert in per:
        most = max(1, min(e, budget // per_expert))
        n_chunks = -(-e // most)
        out.append(-(-e // n_chunks))
    return tuple(out)


def layer_program(spec: LayerSpec, *, inverse: bool, chunks: tuple[int, ...] | None,
                  backend: str = "xla", pallas: bool = False, crop=None):
    """The pure function of four arrays that prepares (or unprepares) one layer.

    ``chunks=None`` transforms each array whole (out of place); otherwise each
    array is transformed chunk by chunk into itself (in place when donated).
    It works on any number of experts as long as ``spec`` says so; the
    sharded path calls it per device on the local experts. ``backend`` is a
    resolved backend (``"xla"`` or ``"flashinfer"``). ``pallas`` moves the weight
    rows with Pallas kernels (CUDA; see ``_pallas``). ``crop`` (inverse only): the valid
    per-device ``(H, I)`` the result is cut back to (out of place).
    """
    fns = _transforms(spec, inverse, backend, pallas, crop)
    if chunks is not None and (spec.needs_padding if not inverse else crop is not None):
        raise ValueError("padding changes shapes: a padded layer cannot be prepared in place")

    def program(*arrays):
        # Dtypes are kept: a bitcast between uint8 and float8 is a full copy in
        # XLA, which would break the one-chunk bound.
        if chunks is None:
            return tuple(fn(x) for x, (fn, _) in zip(arrays, fns))
        outs = []
        for x, (fn, write), c in zip(arrays, fns, chunks):
            if outs:
                # One array after the other, so their chunks never need scratch at once.
                x = lax.optimization_barrier((outs[-1], x))[1]
            outs.append(_chunked(x, fn, c, write))
        return tuple(outs)

    return program


@functools.lru_cache(maxsize=64)
def _compiled(spec: LayerSpec, inverse: bool, donate: bool, chunks, backend: str = "xla",
              pallas: bool = False, plan=None, crop=None, via: str | None = None):
    # Padding (and cropping it back) changes every shape, so no buffer can be reused:
    # transform out of place and let the caller delete the inputs.
    in_place = donate and (crop is None if inverse else not spec.needs_padding)
    if backend == "triton" and not inverse:
        program = _triton.layer_program(spec, chunks=chunks if in_place else None,
                                        pad=_pad(spec), via=via or "callback")
    else:
        program = layer_program(spec, inverse=inverse, chunks=chunks if in_place else None,
                                backend=backend, pallas=pallas, crop=crop)
    if plan is not None:  # sharded: the same program on each device's shard (spec is local)
        return _sharding.jit(program, plan, donate=in_place)
    return jax.jit(program, donate_argnums=(0, 1, 2, 3) if in_place else ())


_to_float8 = jax.jit(lambda x: lax.bitcast_convert_type(x, SCALE_DTYPE), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated call: the per-device ``spec``, the ``chunks`` and the jitted ``program``."""

    arrays: tuple
    spec: LayerSpec
    chunks: tuple[int, ...]
    program: Callable
    donate: bool
    inverse: bool
    valid: LayerSpec | None = None  # the whole layer's sizes (``spec`` is per device)
    backend: str = "xla"  # the resolved backend (``"auto"`` decided)


def _valid_size(name: str, value, *, most: int, caller: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{caller}: {name} must be an int or None, got {value!r}")
    if value <= 0 or value % BLOCK or value > most:
        raise ValueError(f"{caller}: {name} = {value} must be a positive multiple of {BLOCK} "
                         f"and at most the prepared size {most}")
    return int(value)


def _crop_sizes(valid: LayerSpec, local: LayerSpec, hidden_size, intermediate_size,
                caller: str):
    """The per-device ``(H, I)`` that unprepare crops back to (None: no crop)."""
    h = valid.hidden if hidden_size is None else _valid_size(
        "hidden_size", hidden_size, most=valid.hidden, caller=caller)
    if intermediate_size is None:
        i_local = local.intermediate
    else:
        i = _valid_size("intermediate_size", intermediate_size, most=valid.intermediate,
                        caller=caller)
        tp = valid.intermediate // local.intermediate  # devices splitting I (1: unsplit)
        i_local = i // tp
        if i % tp or i_local % BLOCK or dataclasses.replace(
                local, intermediate=i_local).padded_i != local.intermediate:
            raise ValueError(
                f"{caller}: intermediate_size = {i} does not pad to the prepared I = "
                f"{valid.intermediate}" + (f" ({tp} shards of {local.intermediate})" if tp > 1
                                           else "")
                + f": prepare pads I (per device) to a multiple of "
                f"{64 if valid.gated else 128}; pass the layer's own I")
    if (h, i_local) == (local.hidden, local.intermediate):
        return None
    return h, i_local


def plan_job(arrays, *, gated, donate, backend, chunk_bytes, inverse, where="",
             hidden_alignment=DEFAULT_HIDDEN_ALIGNMENT, hidden_size=None,
             intermediate_size=None, caller=None) -> Job:
    """Validate one layer's call and build its program; nothing is run or donated.

    Every refusal of :func:`prepare_layer` is raised here, so callers that handle
    many layers (``prepare``, ``load``) can check them all before donating any.
    ``hidden_size``/``intermediate_size`` (inverse only): the valid sizes to crop to.
    """
    caller = caller or ("unprepare_layer" if inverse else "prepare_layer")
    arrays = tuple(arrays)
    for name, x in zip(NAMES, arrays):
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"{caller}() got a tracer for {where}{name}: it cannot run inside jax.jit, "
                "vmap or grad (it donates and marks concrete arrays, and picks its compiled "
                f"program from their sizes, shardings and devices). Call {caller} outside the "
                "traced function, on concrete arrays; it is already one compiled program. To "
                "read prepared weights inside jit, dequantize_layer(..., layout='trtllm') is "
                "jittable."
            )
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {gated!r}")
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    if not inverse and (hidden_size is not None or intermediate_size is not None):
        raise TypeError(f"{caller}: hidden_size and intermediate_size are for unprepare_layer")
    spec = valid = check_arrays(arrays, gated=gated, prepared=inverse, where=where,
                                hidden_alignment=hidden_alignment)
    for name, x in zip(NAMES, arrays):
        if not inverse and _marks.is_marked(x):
            raise ValueError(
                f"{where}{name} is already in the TRT-LLM layout (it came out of prepare); "
                "preparing it again would shuffle it twice"
            )
    if len({id(x) for x in arrays}) != 4:
        raise ValueError("the four arrays must be distinct objects")
    if not inverse:
        for name, copy in zip(NAMES, _marks.copies(arrays)):
            if copy:
                raise ValueError(
                    f"{where}{name} holds the bytes of an array that came out of prepare (a "
                    "copy of a prepared array?); preparing it again would shuffle it twice. "
                    "Use it as prepared, or unprepare_layer it first"
                )
    plan = _sharding.plan(arrays, gated=gated, prepared=inverse, where=where,
                          hidden_alignment=hidden_alignment)
    if plan is not None:  # sharded over a mesh: sizes and chunks are per device
        spec = plan.local
    crop = None
    if inverse:
        crop = _crop_sizes(valid, spec, hidden_size, intermediate_size, caller)
    pallas = use_pallas(arrays)
    # Last of the checks: "flashinfer" may compile its module (~40 s) on first use.
    # Without Pallas, XLA moves the weights a byte per thread: Triton wins everywhere.
    resolved = resolve_backend(
        backend, arrays, inverse=inverse,
        auto_triton=auto_takes_triton(spec, donate=donate, inverse=inverse, pallas=pallas))
    free = (free_bytes(next(iter(arrays[0].devices())))
            if chunk_bytes is None and donate and isinstance(arrays[0], jax.Array) else None)
    together = resolved == "triton" and not _triton.w13_in_one_pass(spec)
    chunks = experts_per_chunk(spec, chunk_bytes, free, w13_together=together)
    via = _triton.route() if resolved == "triton" and not inverse else None
    program = _compiled(spec, inverse, donate, chunks, resolved, pallas, plan, crop, via)
    return Job(arrays, spec, chunks, program, donate, inverse, valid, resolved)


def run_job(job: Job) -> tuple:
    """Run a planned call: outputs with float8 scales; donated inputs are consumed."""
    outs = list(job.program(*job.arrays))
    for k in (1, 3):
        if outs[k].dtype != SCALE_DTYPE:  # uint8 scale bytes: one copy to float8
            outs[k] = _to_float8(outs[k])
    if job.donate:
        # Consumed even where XLA could not reuse them (padding changes shapes).
        for x in job.arrays:
            if isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()
    if not job.inverse:  # (unprepared inputs that stay alive keep their mark)
        _marks.mark(*outs)
    return tuple(outs)


def _run(arrays, w13_order="up_gate", **options):
    from .tree import fuse as _fuse  # w13_order: the halves swapped around the layout (_fuse.run_ordered)
    _fuse.check_order(w13_order, options["gated"])
    return _fuse.run_ordered(plan_job(arrays, **options), w13_order, run_job)


def prepare_layer(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, *,
                  gated: bool = True, donate: bool = True, backend: str = "auto",
                  chunk_bytes: int | None = None,
                  hidden_alignment: int = DEFAULT_HIDDEN_ALIGNMENT, w13_order: str = "up_gate"):
    """Convert one NVFP4 MoE layer to the TRT-LLM (flashinfer ``trtllm_fp4_block_scale_moe``) layout.

    Byte for byte what vLLM 0.33 produces: ``H`` and ``I`` zero-padded as its
    ``align_fp4_moe_hidden_dim_for_fi`` and ``align_fp4_moe_weights_for_fi``, then
    flashinfer's helpers (``_maybe_get_cached_w3_w1_permute_indices``,
    ``get_w2_permute_indices_with_cache``, ``block_scale_interleave``).

    Parameters
    ----------
    w13_weight : uint8 ``[E, R1, H/2]``
        Packed e2m1 (low nibble first) of the fused up/gate projection. Rows are
        ``[up (w3); gate (w1)]`` with ``R1 = 2I`` when ``gated``, else ``R1 = I``.
        ``E >= 1``; ``H`` and ``I`` positive multiples of 16 (one scale per 16 values;
        both are padded to what the kernel needs).
    w13_weight_scale : float8_e4m3fn or uint8 ``[E, R1, H/16]``
        Linear (row-major) block scales, one per 16 values, same rows as ``w13_weight``.
    w2_weight : uint8 ``[E, H, I/2]``
        Packed e2m1 of the down projection.
    w2_weight_scale : float8_e4m3fn or uint8 ``[E, H, I/16]``
        Linear block scales of ``w2_weight``. uint8 scale bytes cost one extra copy of
        the scales on the way to float8.
    gated : bool, keyword-only
        Whether w13 holds ``[up; gate]`` for a gated activation (interleaved for the kernel).
    donate : bool, keyword-only
        Consume the inputs and work in place in their buffers (extra device memory:
        one chunk). With ``False`` the inputs stay valid and the outputs are new buffers.
    backend : {"auto", "xla", "triton", "flashinfer"}, keyword-only
        ``"xla"`` is pure JAX and runs on every platform. ``"triton"`` moves every array
        with Triton kernels inside the jitted program (CUDA only; needs a CUDA build of
        torch, which brings triton; same bytes; fastest on large layers).
        ``"flashinfer"`` runs the scale swizzle with flashinfer's
        ``block_scale_interleave`` kernel (CUDA only; needs torch and flashinfer; same
        bytes). ``"auto"`` picks ``"triton"`` on CUDA, when installed, where XLA would move
        an array of 2 GiB or more (per device) a byte per thread, and for layers of
        256 MiB or more (per device) that are padded or, donated, whose gated w13 Triton
        moves in place in one pass (``2I`` a power of two up to 1024), else ``"xla"``;
        never flashinfer (measured slower). The rule and its measurements:
        ``_prepare.auto_takes_triton``.
    chunk_bytes : int, optional, keyword-only
        Scratch budget of the in-place loop (with ``"triton"``: gated w13 and its scales
        go through it together; default: 1/32 of the layer, at least
        64 MiB, at most 1/8 of the device's free memory): larger may be faster,
        smaller needs less free memory. Ignored with ``donate=False``.
    hidden_alignment : int, keyword-only
        ``H`` is padded with zeros to ``Hp``, a multiple of this (a positive multiple of
        128; default 256, which flashinfer requires for NVFP4: "128 gives wrong
        results"), as vLLM's ``align_fp4_moe_weights_for_fi``. 128 pads only what the
        layout itself needs.
    w13_order : {"up_gate", "gate_up"}, keyword-only
        The order of each expert's two halves of ``w13_weight`` and its scales (gated):
        ``"up_gate"`` = ``[up (w3); gate (w1)]`` (default; what :func:`load` produces),
        ``"gate_up"`` = ``[gate (w1); up (w3)]`` (Hugging Face, vLLM, tpu-inference). The
        output is the kernel's layout either way. ``"gate_up"`` swaps the halves first, in
        place in the donated buffers (one chunk of scratch; one more pass over w13 and its
        scales); with ``donate=False`` into a temporary copy of w13 and its scales. Sharded:
        per device (with ``I`` split, each device's rows are its own ``[gate; up]``). With
        donation the swap consumes the inputs before the layout runs.

    Returns
    -------
    tuple of jax.Array
        ``(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale)`` with the padded
        shapes ``[E, R1p, Hp/2]``, ``[E, R1p, Hp/16]``, ``[E, Hp, Ip/2]``, ``[E, Hp, Ip/16]``:
        ``Hp`` is ``H`` rounded up to ``hidden_alignment`` (zero columns of w13 and its
        scales, zero rows of w2 and its scales) and ``Ip`` is ``I`` rounded up to a
        multiple of 64 (gated) or 128 (not gated): each half of w13 gets zero rows, w2 zero
        columns (``R1p = 2 Ip`` gated, ``Ip`` not). Padding is applied before the layout,
        so it is permuted with the rest. Without padding the shapes are the inputs'.
        Weights are uint8 with rows permuted; scales are float8_e4m3fn with the nominal
        shape ``[E, rows, K/16]`` and their bytes, flat per expert, in the 128x4 swizzled
        order of the kernel. A padded layer is prepared out of place (new buffers of the
        padded size; donated inputs are deleted).

    Raises
    ------
    TypeError
        A wrong dtype or a non-array argument.
    ValueError
        Inconsistent or empty shapes (``E``, ``H`` or ``I`` zero), ``H % 16 != 0``,
        ``I % 16 != 0``, a ``hidden_alignment`` that is not a positive multiple of 128, an
        unknown backend, ``"flashinfer"`` on non-CUDA arrays, or arrays already prepared or
        deleted (also copies of prepared arrays, where detected: see Notes).
        Nothing is donated when this is raised.
    TypeError
        Called under ``jax.jit``/``vmap``/``grad`` (tracers): call it outside the traced
        function; ``dequantize_layer`` is the jittable reader of prepared arrays.
    ImportError
        ``backend="flashinfer"`` without torch/flashinfer (says what to install);
        nothing is donated.

    Notes
    -----
    Arrays sharded with ``NamedSharding(mesh, P(<axes>))`` along the expert axis are
    prepared where they lie: each device transforms its own experts (in place when
    donated, ``chunk_bytes`` per device), with no communication, and the outputs keep
    the inputs' shardings. If ``I`` is split too (w13 rows and w2 columns over the same
    mesh axes), each device's slice is prepared as its own layer with the local ``I``:
    its w13 rows must be its own ``[up; gate]``. The hidden axis cannot be split.
    Multi-host: each process makes the same call and touches only its own shards.

    Arrays that came out of ``prepare`` are refused (they are marked). So are copies of
    them (``jnp.array(out)``, ``np.asarray(out)``, ``jax.device_put`` elsewhere, also after
    the original is gone), recognised by 64 sampled bytes per array: checking costs
    nothing for inputs whose shape no prepared array had (raw layers of a padded model),
    else one 64-byte gather per array and a wait for the inputs (about 0.1 ms). Not
    recognised: copies whose sampled bytes are all equal (e.g. zeros, the same in either
    layout), or sharded differently from the original, or modified since. By default
    only arrays on the CPU (and numpy arrays) are fingerprinted and checked: on a GPU
    the wait costs about 3 ms a call (H200), so there a copy is caught only through the
    ``nvfp4_layout`` marker leaf that :func:`prepare` puts into its trees.
    ``jax_nvfp4._marks.CHECK_COPIES = True`` checks on every platform, ``False`` nowhere.
    """
    return _run((w13_weight, w13_weight_scale, w2_weight, w2_weight_scale), gated=gated,
                donate=donate, backend=backend, chunk_bytes=chunk_bytes, inverse=False,
                hidden_alignment=hidden_alignment, w13_order=w13_order)


def unprepare_layer(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, *,
                    gated: bool = True, donate: bool = True, backend: str = "auto",
                    chunk_bytes: int | None = None, hidden_size: int | None = None,
                    intermediate_size: int | None = None, w13_order: str = "up_gate"):
    """Exact inverse of :func:`prepare_layer`: the checkpoint layout back, bytes unchanged.

    Takes the arrays ``prepare_layer`` returned (padded shapes ``Hp``, ``Ip``, as listed
    there: ``Hp`` a multiple of 128, ``Ip`` of 64 gated or 128 not gated) and returns them
    in the linear layout, scales as float8_e4m3fn. Options as in :func:`prepare_layer`,
    except that every backend name is accepted but the inverse always runs on XLA
    (flashinfer has no inverse kernel).

    Parameters
    ----------
    hidden_size, intermediate_size : int, optional, keyword-only
        The layer's valid ``H`` and ``I`` (a :class:`PreparedLayer`'s ``.hidden_size`` and
        ``.intermediate_size``): the padding is cropped back, so that
        ``unprepare_layer(*prepare_layer(*x), hidden_size=H, intermediate_size=I)`` gives
        ``x`` exactly (the last ``Hp - H`` columns of w13 and its scales and rows of w2 and
        its scales are dropped; the last ``Ip - I`` rows of each half of w13 and columns of
        w2). Each a positive multiple of 16, at most the prepared size; ``I`` must pad to
        the prepared ``Ip`` (per device when ``I`` is split over devices: the global
        ``I``). None (default): that padding is kept. A crop runs out of place (new
        buffers; donated inputs are deleted).
    w13_order : {"up_gate", "gate_up"}, keyword-only
        The order of w13's halves in the result (``"gate_up"``: swapped back after the
        layout is undone, in place).
    """
    return _run((w13_weight, w13_weight_scale, w2_weight, w2_weight_scale), gated=gated,
                donate=donate, backend=backend, chunk_bytes=chunk_bytes, inverse=True,
                hidden_size=hidden_size, intermediate_size=intermediate_size,
                w13_order=w13_order)
