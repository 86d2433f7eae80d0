"""The TRT-LLM layout as Triton kernels on torch tensors (imported only by ``_triton``).

Every array is moved in units of 4 bytes (``torch.int32`` views of the uint8 /
float8 bytes), and every offset is 64-bit, so arrays of any size work. A
program owns one *group* of destination rows, which is where the layout's
permutations close:

* weights: 32 destination rows (one epilogue-tile shuffle group) x ``bk`` units;
* scales: one 128-row swizzle tile x ``bc`` units (rows and swizzle fused).

It loads the group's source elements (gathered by the index formulas of
``_layout``, contiguous along the row), then stores them contiguously. Where the
source of a group is the group itself (not gated: shuffle groups map onto
themselves, and so do whole swizzle tiles), the same kernel works in place: the
barrier between load and store makes every read happen before any write. Gated
w13 mixes the two halves, so in place it goes through a scratch chunk
(``move_gated_in_place``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(src, dst, ROWS: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                 NG: tl.constexpr, GATED: tl.constexpr, IN_PLACE: tl.constexpr):
    # One program: NG shuffle groups (32 destination rows each) x BK units of one expert.
    pid = tl.program_id(0)
    nkb: tl.constexpr = (K + BK - 1) // BK
    blocks: tl.constexpr = ROWS // (32 * NG)
    kb = pid % nkb
    g = pid // nkb
    e = g // blocks
    r = tl.arange(0, 32 * NG)
    q = (g % blocks) * NG + r // 32
    r = r % 32
    if GATED:  # destination row 32q + 16j + 8h + u <- source h * I + 16q + 2u + j
        src_row = ((r // 8) % 2) * (ROWS // 2) + 16 * q + 2 * (r % 8) + r // 16
    else:  # destination row 32q + 8b + c <- source 32q + 4c + b
        src_row = 32 * q + 4 * (r % 8) + r // 8
    k = kb * BK + tl.arange(0, BK)
    base = e.to(tl.int64) * (ROWS * K)
    mask = (k < K)[None, :]
    x = tl.load(src + base + src_row.to(tl.int64)[:, None] * K + k[None, :], mask=mask)
    if IN_PLACE:
        tl.debug_barrier()  # every read of the groups before any write
    dst_row = 32 * q + r
    tl.store(dst + base + dst_row.to(tl.int64)[:, None] * K + k[None, :], x, mask=mask)


@triton.jit
def _scales_kernel(src, dst, ROWS: tl.constexpr, CU: tl.constexpr, BC: tl.constexpr,
                   NT: tl.constexpr, GATED: tl.constexpr, IN_PLACE: tl.constexpr):
    # One program: NT swizzle tiles (128 rows each) x BC units of one expert.
    pid = tl.program_id(0)
    ncb: tl.constexpr = (CU + BC - 1) // BC
    blocks: tl.constexpr = ROWS // (128 * NT)
    cb = pid % ncb
    g = pid // ncb
    e = g // blocks
    t = tl.arange(0, 128 * NT)
    a = (g % blocks) * NT + t // 128
    t = t % 128  # place in the tile's 128 x 4 block: (b, c, a0) or (j, h, u, q0)
    if GATED:  # t = 64j + 32h + 4u + q0 <- source row h * I + 64a + 16q0 + 2u + j
        src_row = ((t // 32) % 2) * (ROWS // 2) + 64 * a + 16 * (t % 4) + 2 * ((t // 4) % 8) \
            + t // 64
    else:  # t = 32b + 4c + a0 <- source row 128a + 32a0 + 4c + b
        src_row = 128 * a + 32 * (t % 4) + 4 * ((t // 4) % 8) + t // 32
    cu = cb * BC + tl.arange(0, BC)
    base = e.to(tl.int64) * (ROWS * CU)
    mask = (cu < CU)[None, :]
    x = tl.load(src + base + src_row.to(tl.int64)[:, None] * CU + cu[None, :], mask=mask)
    if IN_PLACE:
        tl.debug_barrier()
    dst_off = base + a.to(tl.int64)[:, None] * (128 * CU) + cu[None, :].to(tl.int64) * 128 \
        + t[:, None]
    tl.store(dst + dst_off, x, mask=mask)


def _units(x):
    """The bytes of ``x`` (uint8 / float8, ``[E, rows, cols]``, cols % 4 == 0) as int32 units."""
    return x.view(torch.uint8).view(torch.int32)


# Units (4 bytes) a program moves at most: small rows are batched into larger programs.
TILE_UNITS = 8192


def _pow2_at_most(n: int, most: int) -> int:
    return min(most, triton.next_power_of_2(n))


def _batch(count: int, size: int) -> int:
    """Largest power of two dividing ``count`` with ``batch * size <= TILE_UNITS``."""
    b = 1
    while count % (2 * b) == 0 and 2 * b * size <= TILE_UNITS:
        b *= 2
    return b


def _warps(units: int) -> int:
    return 8 if units >= 8192 else 4


def move_rows(src, dst, *, gated: bool, in_place: bool = False) -> None:
    """``dst[e]`` = the shuffled (and, ``gated``, interleaved) rows of ``src[e]``.

    ``src``, ``dst``: ``[E, rows, K]`` bytes, ``rows % 32 == 0`` (``% 64`` gated),
    ``K % 4 == 0``. ``in_place`` (``dst`` is ``src``) only when not gated.
    """
    e, rows, k = src.shape
    assert not (in_place and gated), "gated rows cannot move in place"
    ku = k // 4
    bk = _pow2_at_most(ku, 256)
    ng = _batch(rows // 32, 32 * bk)
    grid = (e * (rows // (32 * ng)) * triton.cdiv(ku, bk),)
    _rows_kernel[grid](_units(src), _units(dst), ROWS=rows, K=ku, BK=bk, NG=ng, GATED=gated,
                       IN_PLACE=in_place, num_warps=_warps(32 * ng * bk))


def move_scales(src, dst, *, gated: bool, in_place: bool = False) -> None:
    """``dst[e]`` = the rows of ``src[e]`` permuted as the weights', then swizzled 128x4.

    ``src``, ``dst``: ``[E, rows, C]`` bytes, ``rows % 128 == 0``, ``C % 4 == 0``.
    ``in_place`` only when not gated (each tile is then its own source).
    """
    e, rows, c = src.shape
    assert not (in_place and gated), "gated scales cannot move in place"
    cu = c // 4
    # In place a program must own its whole tile; otherwise narrower blocks spread the work.
    bc = triton.next_power_of_2(cu) if in_place else _pow2_at_most(cu, 16)
    nt = _batch(rows // 128, 128 * bc)
    grid = (e * (rows // (128 * nt)) * triton.cdiv(cu, bc),)
    _scales_kernel[grid](_units(src), _units(dst), ROWS=rows, CU=cu, BC=bc, NT=nt, GATED=gated,
                         IN_PLACE=in_place, num_warps=_warps(128 * nt * bc))


def move_gated_in_place(x, scratch, *, chunk: int, move) -> None:
    """``move(src, dst, gated=True)`` onto ``x`` itself, ``chunk`` experts at a time
    through ``scratch`` (at least ``chunk`` experts of bytes): moved into scratch,
    then copied back (``copy_``: a device memcpy)."""
    e = x.shape[0]
    per = x[0].numel() * x.element_size()
    flat = scratch.view(torch.uint8).reshape(-1)
    for start in range(0, e, chunk):
        n = min(chunk, e - start)
        part = x[start:start + n]
        tmp = flat[:n * per].view(part.dtype).reshape(part.shape)
        move(part, tmp, gated=True)
        part.copy_(tmp)
