"""Row permutations of the weights as Pallas kernels (Triton on CUDA GPUs).

XLA's GPU emitters move uint8 data one byte per thread (about a third of the
copy bandwidth on an H200, benchmarks/DESIGN-RECORD.md), and a uint8 -> uint32 bitcast
in a jitted program is expanded into shifts, not a reinterpretation. The row
permutations keep whole rows of ``K`` bytes together, so a kernel that copies
blocks of rows moves 16 bytes per thread: each program copies the ``s`` source
rows that become ``s`` consecutive output rows (a rectangular block in the
source view), ``kb`` bytes wide.

Used by ``xla`` for the weight arrays on CUDA (the option ``pallas``); the
result is the same bytes as ``layout.index.move``. Elsewhere (CPU tests) it runs in
Pallas' interpreter.
"""

from __future__ import annotations

import math

import jax
from jax.experimental import pallas as pl

# Widest block of a row copied by one program (bytes, a power of two).
MAX_BLOCK_COLS = 1024
# Pallas' Triton lowering computes offsets in int32: on an H200 a 3.76 GB array
# (DeepSeek-V3 w13, 256 experts) came out wrong while 0.47 GB ones were exact.
# Arrays from 2**31 bytes on stay on XLA.
MAX_ARRAY_BYTES = 2**31 - 1


def fits(nbytes: int) -> bool:
    """Whether an array of ``nbytes`` bytes can go through these kernels."""
    return nbytes <= MAX_ARRAY_BYTES


def _pow2_divisor(k: int, most: int) -> int:
    b = 1
    while b * 2 <= most and k % (b * 2) == 0:
        b *= 2
    return b


def _digits(g, sizes):
    """Mixed-radix digits of ``g`` (major first) for ``sizes``."""
    out = []
    for s in reversed(sizes):
        out.append(g % s)
        g = g // s
    return out[::-1]


def _copy_kernel(*refs):
    refs[-1][...] = refs[-2][...]


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def move_rows(x, view, perm, *, start: int = 0, experts: int | None = None):
    """``_layout.move(x[start:start + experts], view, perm)`` for a permutation of rows only.

    ``x`` is ``[E, rows, K]`` (1-byte elements), ``view = (*row_axes, K)`` and
    ``perm`` keeps ``K`` last. Returns ``[experts, rows, K]``.
    """
    e_all, rows, k = x.shape
    experts = e_all if experts is None else experts
    n = len(view) - 1
    row_sizes = tuple(view[:n])
    out_sizes = tuple(view[p] for p in perm[:n])
    last_src = perm[n - 1]  # the source axis that becomes the output's last row axis
    s = view[last_src]
    kb = _pow2_divisor(k, MAX_BLOCK_COLS)
    groups = math.prod(out_sizes[:-1])
    sq = pl.Squeezed() if hasattr(pl, "Squeezed") else None

    def out_index(g, e, c):
        return (e, *_digits(g, out_sizes[:-1]), 0, c)

    def in_index(g, e, c):
        d = _digits(g, out_sizes[:-1])
        src = [0] * n
        for i, p in enumerate(perm[:n - 1]):
            src[p] = d[i]
        return (e + start, *src, c)

    in_block = (sq, *(s if a == last_src else sq for a in range(n)), kb)
    out_block = (sq, *([sq] * (n - 1)), s, kb)
    y = pl.pallas_call(
        _copy_kernel,
        out_shape=jax.ShapeDtypeStruct((experts, *out_sizes, k), x.dtype),
        grid=(groups, experts, k // kb),
        in_specs=[pl.BlockSpec(in_block, in_index)],
        out_specs=pl.BlockSpec(out_block, out_index),
        interpret=_interpret(),
        name="nvfp4_move_rows",
    )(x.reshape(e_all, *row_sizes, k))
    return y.reshape(experts, rows, k)


def write_block(buf, block, start: int):
    """``buf`` ``[E, rows, K]`` with ``block`` ``[n, rows, K]`` written at expert ``start``
    (aliased: in place when ``buf`` is donated). Experts are contiguous, so both are
    copied as ``[*, R, kb]`` blocks of 8 x up to 1024 bytes whatever ``rows, K`` are."""
    e_all = buf.shape[0]
    n = block.shape[0]
    per = math.prod(buf.shape[1:])
    kb = _pow2_divisor(per, MAX_BLOCK_COLS)
    rows = per // kb
    rb = _pow2_divisor(rows, 8)
    sq = pl.Squeezed() if hasattr(pl, "Squeezed") else None
    out = pl.pallas_call(
        _copy_kernel,
        out_shape=jax.ShapeDtypeStruct((e_all, rows, kb), buf.dtype),
        grid=(rows // rb, n),
        in_specs=[pl.BlockSpec((sq, rb, kb), lambda r, e: (e + start, r, 0)),
                  pl.BlockSpec((sq, rb, kb), lambda r, e: (e, r, 0))],
        out_specs=pl.BlockSpec((sq, rb, kb), lambda r, e: (e + start, r, 0)),
        input_output_aliases={0: 0},
        interpret=_interpret(),
        name="nvfp4_write_block",
    )(buf.reshape(e_all, rows, kb), block.reshape(n, rows, kb))
    return out.reshape(buf.shape)
