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

# Row blocks of the epilogue-tile-128 shuffle (flashinfer: block 32 = 8 x 4).
SHUFFLE_ROWS = 32
# The 128x4 scale tile of the TRT-LLM kernels.
TILE_ROWS, TILE_COLS = 128, 4


def _permute(x, view, perm):
    """Reshape the row axis of ``x`` into ``view``, transpose, flatten back."""
    e, rows, cols = x.shape
    return x.reshape(e, *view, cols).transpose(0, *perm, len(view) + 1).reshape(e, rows, cols)


def shuffle_rows(x):
    """Epilogue-tile shuffle of the rows of ``x`` ``[E, M, K]``, ``M % 32 == 0``."""
    return _permute(x, (x.shape[1] // 32, 8, 4), (1, 3, 2))


def unshuffle_rows(x):
    """Inverse of :func:`shuffle_rows`."""
    return _permute(x, (x.shape[1] // 32, 4, 8), (1, 3, 2))


def shuffle_gated_rows(x):
    """w3/w1 interleave + shuffle of ``x`` ``[E, 2I, K]`` (rows ``[up; gate]``), ``I % 16 == 0``."""
    return _permute(x, (2, x.shape[1] // 32, 8, 2), (2, 4, 1, 3))


def unshuffle_gated_rows(x):
    """Inverse of :func:`shuffle_gated_rows`."""
    return _permute(x, (x.shape[1] // 32, 2, 2, 8), (3, 1, 4, 2))


def swizzle_scales(x):
    """128x4 tile swizzle of each expert's ``[R, C]`` block; ``R % 128 == 0``, ``C % 4 == 0``.

    The result keeps the nominal shape ``[E, R, C]``; its bytes, read flat per
    expert, are in the kernel's order.
    """
    e, r, c = x.shape
    t = x.reshape(e, r // 128, 4, 32, c // 4, 4).transpose(0, 1, 4, 3, 2, 5)
    return t.reshape(e, r, c)


def unswizzle_scales(x):
    """Inverse of :func:`swizzle_scales`."""
    e, r, c = x.shape
    t = x.reshape(e, r // 128, c // 4, 32, 4, 4).transpose(0, 1, 4, 3, 2, 5)
    return t.reshape(e, r, c)


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
