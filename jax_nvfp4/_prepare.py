"""prepare_layer / unprepare_layer: one MoE layer to and from the TRT-LLM layout.

With donation the work runs in place: a ``lax.fori_loop`` over chunks of
experts reads one chunk, transforms it and writes it back with
``lax.dynamic_update_slice`` into the donated buffer, so the only extra
device memory is one chunk. Without donation it is one out-of-place
transform per array (fastest; the caller keeps the inputs).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from . import _layout, _marks, _sharding
from ._spec import BLOCK, NAMES, SCALE_DTYPE, LayerSpec, check_arrays

BACKENDS = ("auto", "xla")
# Largest default scratch per chunk; see experts_per_chunk.
DEFAULT_CHUNK_BYTES = 256 << 20

Transform = Callable[[jax.Array], jax.Array]


def _forward(spec: LayerSpec) -> tuple[Transform, ...]:
    """Per-array transforms from the checkpoint layout to the TRT-LLM layout."""
    ip = spec.padded_i
    if spec.gated:
        def rows13(x):
            return _layout.shuffle_gated_rows(_layout.pad_gated_rows(x, ip))
    else:
        def rows13(x):
            return _layout.shuffle_rows(_layout.pad_rows(x, ip))

    def w2(x):
        return _layout.shuffle_rows(_layout.pad_cols(x, ip // 2))

    def s2(x):
        return _layout.swizzle_scales(_layout.shuffle_rows(_layout.pad_cols(x, ip // BLOCK)))

    return rows13, lambda x: _layout.swizzle_scales(rows13(x)), w2, s2


def _inverse(spec: LayerSpec) -> tuple[Transform, ...]:
    """Per-array transforms from the TRT-LLM layout back (padding stays)."""
    rows13 = _layout.unshuffle_gated_rows if spec.gated else _layout.unshuffle_rows
    return (
        rows13,
        lambda x: rows13(_layout.unswizzle_scales(x)),
        _layout.unshuffle_rows,
        lambda x: _layout.unshuffle_rows(_layout.unswizzle_scales(x)),
    )


def _chunked(x, fn: Transform, chunk: int):
    """``fn`` applied to ``x`` chunk by chunk of ``chunk`` experts, written back into ``x``.

    ``fn`` must keep the shape. Under donation XLA updates the buffer in place,
    so the scratch is one chunk.
    """
    def step(start, size, buf):
        block = lax.dynamic_slice_in_dim(buf, start, size, axis=0)
        return lax.dynamic_update_slice_in_dim(buf, fn(block), start, axis=0)

    n, tail = divmod(x.shape[0], chunk)
    if n:
        x = lax.fori_loop(0, n, lambda k, buf: step(k * chunk, chunk, buf), x)
    if tail:
        x = step(n * chunk, tail, x)
    return x


def experts_per_chunk(spec: LayerSpec, chunk_bytes: int | None) -> tuple[int, ...]:
    """Experts per chunk for each of the four arrays, so a chunk is at most ``chunk_bytes``.

    Chunks are made as even as possible (``E = n * chunk + tail`` with a small tail).
    """
    if chunk_bytes is None:
        # A small slice of the layer, so the scratch stays a few percent of it.
        budget = min(DEFAULT_CHUNK_BYTES, spec.nbytes // 32)
    elif isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, (int, np.integer)) \
            or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    else:
        budget = int(chunk_bytes)
    e = spec.experts
    out = []
    for shape in spec.shapes(padded=True):
        per_expert = int(np.prod(shape[1:]))
        most = max(1, min(e, budget // per_expert))
        n_chunks = -(-e // most)
        out.append(-(-e // n_chunks))
    return tuple(out)


def layer_program(spec: LayerSpec, *, inverse: bool, chunks: tuple[int, ...] | None):
    """The pure function of four arrays that prepares (or unprepares) one layer.

    ``chunks=None`` transforms each array whole (out of place); otherwise each
    array is transformed chunk by chunk into itself (in place when donated).
    It works on any number of experts as long as ``spec`` says so; the
    sharded path calls it per device on the local experts.
    """
    fns = _inverse(spec) if inverse else _forward(spec)
    if chunks is not None and not inverse and spec.needs_padding:
        raise ValueError("padding changes shapes: a padded layer cannot be prepared in place")

    def program(*arrays):
        # Dtypes are kept: a bitcast between uint8 and float8 is a full copy in
        # XLA, which would break the one-chunk bound.
        if chunks is None:
            return tuple(fn(x) for x, fn in zip(arrays, fns))
        return tuple(_chunked(x, fn, c) for x, fn, c in zip(arrays, fns, chunks))

    return program


@functools.lru_cache(maxsize=64)
def _compiled(spec: LayerSpec, inverse: bool, donate: bool, chunks, plan=None):
    # Padding changes every shape, so no buffer can be reused: transform out of
    # place and let the caller delete the inputs.
    in_place = donate and (inverse or not spec.needs_padding)
    program = layer_program(spec, inverse=inverse, chunks=chunks if in_place else None)
    if plan is not None:  # sharded: the same program on each device's shard (spec is local)
        return _sharding.jit(program, plan, donate=in_place)
    return jax.jit(program, donate_argnums=(0, 1, 2, 3) if in_place else ())


_to_float8 = jax.jit(lambda x: lax.bitcast_convert_type(x, SCALE_DTYPE), donate_argnums=0)


def resolve_backend(backend: str, arrays) -> str:
    """The backend that will run: validates the name before anything is donated."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "xla"


def _run(arrays, *, gated, donate, backend, chunk_bytes, inverse, where=""):
    arrays = tuple(arrays)
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {gated!r}")
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    resolve_backend(backend, arrays)
    spec = check_arrays(arrays, gated=gated, prepared=inverse, where=where)
    for name, x in zip(NAMES, arrays):
        if not inverse and _marks.is_marked(x):
            raise ValueError(
                f"{where}{name} is already in the TRT-LLM layout (it came out of prepare); "
                "preparing it again would shuffle it twice"
            )
    if len({id(x) for x in arrays}) != 4:
        raise ValueError("the four arrays must be distinct objects")
    plan = _sharding.plan(arrays, gated=gated, prepared=inverse, where=where)
    if plan is not None:  # sharded over a mesh: sizes and chunks are per device
        spec = plan.local
    chunks = experts_per_chunk(spec, chunk_bytes)
    outs = list(_compiled(spec, inverse, donate, chunks, plan)(*arrays))
    for k in (1, 3):
        if outs[k].dtype != SCALE_DTYPE:  # uint8 scale bytes: one copy to float8
            outs[k] = _to_float8(outs[k])
    if donate:
        # Consumed even where XLA could not reuse them (padding changes shapes).
        for x in arrays:
            if isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()
    if not inverse:  # (unprepared inputs that stay alive keep their mark)
        _marks.mark(*outs)
    return tuple(outs)


def prepare_layer(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, *,
                  gated: bool = True, donate: bool = True, backend: str = "auto",
                  chunk_bytes: int | None = None):
    """Convert one NVFP4 MoE layer to the TRT-LLM (flashinfer ``trtllm_fp4_block_scale_moe``) layout.

    Byte for byte what flashinfer's helpers (``_maybe_get_cached_w3_w1_permute_indices``,
    ``get_w2_permute_indices_with_cache``, ``block_scale_interleave``) produce.

    Parameters
    ----------
    w13_weight : uint8 ``[E, R1, H/2]``
        Packed e2m1 (low nibble first) of the fused up/gate projection. Rows are
        ``[up (w3); gate (w1)]`` with ``R1 = 2I`` when ``gated``, else ``R1 = I``.
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
    backend : {"auto", "xla"}, keyword-only
        ``"xla"`` is pure JAX and runs on every platform; ``"auto"`` picks the best available.
    chunk_bytes : int, optional, keyword-only
        Scratch budget of the in-place loop (default: 1/32 of the layer, at most
        256 MiB): larger may be faster, smaller needs less free memory. Ignored with
        ``donate=False``.

    Returns
    -------
    tuple of jax.Array
        ``(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale)`` with the input
        shapes, except that ``I`` is padded with zeros to a multiple of 64 (gated) or 128
        (not gated) when needed: each half of w13 gets zero rows, w2 zero columns.
        Weights are uint8 with rows permuted; scales are float8_e4m3fn with the nominal
        shape ``[E, rows, K/16]`` and their bytes, flat per expert, in the 128x4 swizzled
        order of the kernel.

    Raises
    ------
    TypeError
        A wrong dtype or a non-array argument.
    ValueError
        Inconsistent shapes, ``H % 128 != 0``, ``I % 16 != 0``, an unknown backend, or
        arrays already prepared or deleted. Nothing is donated when this is raised.

    Notes
    -----
    Arrays sharded with ``NamedSharding(mesh, P(<axes>))`` along the expert axis are
    prepared where they lie: each device transforms its own experts (in place when
    donated, ``chunk_bytes`` per device), with no communication, and the outputs keep
    the inputs' shardings. If ``I`` is split too (w13 rows and w2 columns over the same
    mesh axes), each device's slice is prepared as its own layer with the local ``I``:
    its w13 rows must be its own ``[up; gate]``. The hidden axis cannot be split.
    Multi-host: each process makes the same call and touches only its own shards.
    """
    return _run((w13_weight, w13_weight_scale, w2_weight, w2_weight_scale), gated=gated,
                donate=donate, backend=backend, chunk_bytes=chunk_bytes, inverse=False)


def unprepare_layer(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, *,
                    gated: bool = True, donate: bool = True, backend: str = "auto",
                    chunk_bytes: int | None = None):
    """Exact inverse of :func:`prepare_layer`: the checkpoint layout back, bytes unchanged.

    Takes the arrays ``prepare_layer`` returned (shapes as listed there, with ``I``
    already padded) and returns them in the linear layout, scales as
    float8_e4m3fn. Padding added by ``prepare_layer`` is kept. Options as in
    :func:`prepare_layer`.
    """
    return _run((w13_weight, w13_weight_scale, w2_weight, w2_weight_scale), gated=gated,
                donate=donate, backend=backend, chunk_bytes=chunk_bytes, inverse=True)
