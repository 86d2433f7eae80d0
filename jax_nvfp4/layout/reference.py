"""An independent numpy reference of the TRT-LLM layout, for checks.

It follows flashinfer's own definitions rather than this package's
reshape/transpose code: row permutations as gather indices
(``srcToDstBlk32RowMap`` and the gated interleave, ``trtllm-layout.md`` §2.2)
and the scale swizzle as a scatter through the CUDA kernel's offset function
``get_sf_out_offset_128x4`` (§3.1). Slow and simple on purpose.
"""

from __future__ import annotations

import numpy as np

from .spec import BLOCK


def shuffle_index(m: int) -> np.ndarray:
    """Gather index of the epilogue-tile-128 shuffle: ``out[d] = in[idx[d]]``."""
    d = np.arange(m)
    return 32 * (d // 32) + 4 * (d % 8) + (d % 32) // 8


def gated_index(m: int) -> np.ndarray:
    """Gather index of the w3/w1 interleave: even rows from the first half, odd from the second."""
    i = np.arange(m)
    return (i % 2) * (m // 2) + i // 2


def w13_row_index(m: int, *, gated: bool) -> np.ndarray:
    """Gather index for w13 (weights and scales): interleave then shuffle."""
    s = shuffle_index(m)
    return gated_index(m)[s] if gated else s


def sf_offset_128x4(b, r, c, rows: int, cols: int):
    """``get_sf_out_offset_128x4`` of the CUDA kernel, for the padded ``rows x cols`` block."""
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    return (
        b * rp * cp
        + (r // 128) * (cp // 4) * 512
        + (c // 4) * 512
        + (r % 32) * 16
        + ((r % 128) // 32) * 4
        + (c % 4)
    )


def swizzle(x: np.ndarray) -> np.ndarray:
    """128x4 swizzle of ``x`` ``[B, R, C]`` bytes to the flat ``[B * Rp * Cp]`` kernel output."""
    b, r, c = x.shape
    rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
    out = np.zeros(b * rp * cp, dtype=x.dtype)
    bi, ri, ci = np.meshgrid(np.arange(b), np.arange(r), np.arange(c), indexing="ij")
    out[sf_offset_128x4(bi, ri, ci, r, c)] = x
    return out


def _pad_i(w13, s13, w2, s2, i: int, ip: int, gated: bool):
    """vLLM's padding: each half of w13 gets zero rows; w2 gets zero columns."""
    def rows(x):
        halves = np.split(x, 2, axis=1) if gated else [x]
        z = np.zeros((x.shape[0], ip - i, x.shape[2]), x.dtype)
        return np.concatenate([p for h in halves for p in (h, z)], axis=1)

    def cols(x, n):
        return np.concatenate([x, np.zeros((*x.shape[:2], n - x.shape[2]), x.dtype)], axis=2)

    return rows(w13), rows(s13), cols(w2, ip // 2), cols(s2, ip // BLOCK)


def _pad_h(w13, s13, w2, s2, h: int, hp: int):
    """vLLM's ``align_fp4_moe_hidden_dim_for_fi``: zero columns of w13 and its scales,
    zero rows of w2 and its scales, from ``H`` to ``Hp``."""
    def into(x, shape, fill):
        out = np.zeros(shape, x.dtype)
        fill(out, x)
        return out

    e, r1 = w13.shape[:2]
    return (into(w13, (e, r1, hp // 2), lambda o, x: o.__setitem__(np.s_[:, :, :h // 2], x)),
            into(s13, (e, r1, hp // BLOCK),
                 lambda o, x: o.__setitem__(np.s_[:, :, :h // BLOCK], x)),
            into(w2, (e, hp, w2.shape[2]), lambda o, x: o.__setitem__(np.s_[:, :h], x)),
            into(s2, (e, hp, s2.shape[2]), lambda o, x: o.__setitem__(np.s_[:, :h], x)))


def pad_layer(w13, s13, w2, s2, *, gated: bool = True, hidden_alignment: int = 256):
    """vLLM's padding (H to ``hidden_alignment``, then I to 64 gated / 128 not), numpy uint8."""
    w13, s13, w2, s2 = (np.asarray(a).view(np.uint8) for a in (w13, s13, w2, s2))
    h = w2.shape[1]
    hp = -(-h // hidden_alignment) * hidden_alignment
    if hp != h:
        w13, s13, w2, s2 = _pad_h(w13, s13, w2, s2, h, hp)
    i = 2 * w2.shape[2]
    ip = -(-i // (64 if gated else 128)) * (64 if gated else 128)
    if ip != i:
        w13, s13, w2, s2 = _pad_i(w13, s13, w2, s2, i, ip, gated)
    return w13, s13, w2, s2


def prepare_layer(w13, s13, w2, s2, *, gated: bool = True, hidden_alignment: int = 256):
    """Reference of ``jax_nvfp4.prepare_layer`` on numpy uint8 arrays; scales returned as uint8.

    Padding as vLLM 0.33 (``align_fp4_moe_hidden_dim_for_fi`` then
    ``align_fp4_moe_weights_for_fi``), then flashinfer's row indices and swizzle.
    """
    w13, s13, w2, s2 = pad_layer(w13, s13, w2, s2, gated=gated,
                                 hidden_alignment=hidden_alignment)
    p13 = w13_row_index(w13.shape[1], gated=gated)
    p2 = shuffle_index(w2.shape[1])
    out_s13 = swizzle(s13[:, p13, :]).reshape(s13.shape)
    out_s2 = swizzle(s2[:, p2, :]).reshape(s2.shape)
    return w13[:, p13, :], out_s13, w2[:, p2, :], out_s2
