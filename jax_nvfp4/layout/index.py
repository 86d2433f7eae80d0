"""The TRT-LLM NVFP4 MoE layout as reshapes and transposes.

Every function here is pure, works on any number of experts along axis 0, and
maps a ``[E, rows, cols]`` byte array to another of the same shape. Nothing
here validates: callers (``_spec``) check shapes first.

Row permutations (``trtllm-layout.md`` §2, §9):

* epilogue-tile shuffle (block 32): destination row ``d = 32a + 8b + c`` takes
  source row ``32a + 4c + b``, i.e. rows viewed as ``(a, c=8, b=4)`` are
  transposed to ``(a, b, c)``;
* gated w13 (rows ``[up; gate]``, ``M = 2I``): the w3/w1 interleave composed
  with the shuffle views the rows as ``(half=2, q=I/16, u=8, j=2)`` and
  transposes them to ``(q, j, half, u)``.

Scales (§3.1): after the same row permutation, each expert's ``[R, C]`` block
(``R % 128 == 0``, ``C % 4 == 0``) is tiled 128x4:
``(R/128, 4, 32, C/4, 4) -> (R/128, C/4, 32, 4, 4)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def move(x, view, perm):
    """``x`` ``[E, rows, cols]`` viewed as ``[E, *view]``, the view axes permuted by
    ``perm``, flattened back to ``[E, rows, cols]``.

    Every transform below keeps the last view axis last (bytes contiguous in
    input and output). Moving them as wider ints does not help XLA: a uint8 ->
    uint32 bitcast inside a jitted program is expanded into shifts
    (benchmarks/DESIGN-RECORD.md); ``_pallas`` moves whole rows instead.
    """
    e, rows, cols = x.shape
    y = x.reshape(e, *view).transpose(0, *(p + 1 for p in perm))
    return y.reshape(e, rows, cols)


def unmove(x, view, perm):
    """Inverse of :func:`move` with the same ``view`` and ``perm``."""
    return move(x, tuple(view[p] for p in perm), tuple(int(i) for i in np.argsort(perm)))


# Each transform is a (view, perm) pair for move(); the row counts M and the
# column counts K/C are the per-expert sizes of the array moved.

def rows_move(m: int, k: int):
    """Epilogue-tile shuffle: rows ``(a, c=8, b=4)`` -> ``(a, b, c)``; whole rows of ``k`` bytes."""
    return (m // 32, 8, 4, k), (0, 2, 1, 3)


def gated_rows_move(m: int, k: int):
    """w3/w1 interleave + shuffle: rows ``(half=2, q, u=8, j=2)`` -> ``(q, j, half, u)``."""
    return (2, m // 32, 8, 2, k), (1, 3, 0, 2, 4)


def swizzle_move(r: int, c: int):
    """128x4 swizzle: ``(R/128, 4, 32, C/4, 4) -> (R/128, C/4, 32, 4, 4)``."""
    return (r // 128, 4, 32, c // 4, 4), (0, 3, 2, 1, 4)


def rows_swizzle_move(r: int, c: int):
    """Shuffle then swizzle as one transpose.

    Destination row ``d = 32a + 8b + c`` (source ``32a + 4c + b``) lands in tile
    ``(a // 4, a % 4, 8b + c)``, so the source view ``(A, a0, c, b, C/4, 4)``
    goes to ``(A, C/4, b, c, a0, 4)``.
    """
    return (r // 128, 4, 8, 4, c // 4, 4), (0, 4, 3, 2, 1, 5)


def gated_rows_swizzle_move(r: int, c: int):
    """Interleave + shuffle, then swizzle, as one transpose.

    Destination row ``d = 32q + 16j + 8h + u`` lands in tile ``(q // 4, q % 4, d % 32)``,
    so the source view ``(h, Q, q0, u, j, C/4, 4)`` goes to ``(Q, C/4, j, h, u, q0, 4)``.
    """
    return (2, r // 128, 4, 8, 2, c // 4, 4), (1, 5, 4, 0, 3, 2, 6)


def swizzle_scales(x):
    """128x4 tile swizzle of each expert's ``[R, C]`` block; ``R % 128 == 0``, ``C % 4 == 0``.

    The result keeps the nominal shape ``[E, R, C]``; its bytes, read flat per
    expert, are in the kernel's order.
    """
    return move(x, *swizzle_move(*x.shape[1:]))


def unswizzle_scales(x):
    """Inverse of :func:`swizzle_scales`."""
    return unmove(x, *swizzle_move(*x.shape[1:]))


def pad_gated_rows(x, padded_i):
    """Pad each half of ``x`` ``[E, 2I, K]`` with zero rows to ``[E, 2*padded_i, K]``."""
    e, rows, cols = x.shape
    i = rows // 2
    if i == padded_i:
        return x
    return jnp.pad(x.reshape(e, 2, i, cols), ((0, 0), (0, 0), (0, padded_i - i), (0, 0))).reshape(
        e, 2 * padded_i, cols
    )


def pad_rows(x, padded_rows):
    """Pad ``x`` ``[E, M, K]`` with zero rows at the end to ``[E, padded_rows, K]``."""
    if x.shape[1] == padded_rows:
        return x
    return jnp.pad(x, ((0, 0), (0, padded_rows - x.shape[1]), (0, 0)))


def pad_cols(x, padded_cols):
    """Pad ``x`` ``[E, M, K]`` with zero columns at the end to ``[E, M, padded_cols]``."""
    if x.shape[2] == padded_cols:
        return x
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded_cols - x.shape[2])))


def crop_gated_rows(x, i):
    """Keep the first ``i`` rows of each half of ``x`` ``[E, 2Ip, K]``: ``[E, 2i, K]``."""
    e, rows, cols = x.shape
    if rows == 2 * i:
        return x
    return x.reshape(e, 2, rows // 2, cols)[:, :, :i].reshape(e, 2 * i, cols)


def crop_rows(x, rows):
    """The first ``rows`` rows of ``x`` ``[E, M, K]``."""
    return x if x.shape[1] == rows else x[:, :rows]


def crop_cols(x, cols):
    """The first ``cols`` columns of ``x`` ``[E, M, K]``."""
    return x if x.shape[2] == cols else x[:, :, :cols]
