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


@triton.jit
def _copy_kernel(src, dst, N: tl.constexpr, BLOCK: tl.constexpr):
    # dst[:N] = src[:N] (int32 units): the copy back from scratch.
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < N
    tl.store(dst + off, tl.load(src + off, mask=mask), mask=mask)


# Units (4 bytes) a program moves at most: small rows are batched into larger programs.
TILE_UNITS = 8192
COPY_BLOCK = 8192


def _pow2_divisor(n: int, most: int) -> int:
    b = 1
    while n % (2 * b) == 0 and 2 * b <= most:
        b *= 2
    return b


def _batch(count: int, size: int) -> int:
    """Largest power of two dividing ``count`` with ``batch * size <= TILE_UNITS``."""
    b = 1
    while count % (2 * b) == 0 and 2 * b * size <= TILE_UNITS:
        b *= 2
    return b


def _warps(units: int) -> int:
    return 8 if units >= 8192 else 4


def _block(k: int, most: int) -> int:
    """Columns per program: a power-of-two divisor of ``k`` (no masked lanes) unless
    that is narrow, then the next power of two over ``k`` (masked), at most ``most``."""
    d = _pow2_divisor(k, most)
    return d if d >= min(32, most) or d == k else min(most, triton.next_power_of_2(k))


class Step:
    """One kernel launch: ``fn`` from buffer ``src`` to ``dst`` (indices into the call's
    buffers) at byte offsets, over ``grid`` programs, with compile-time ``consts``."""

    def __init__(self, fn, grid, consts, src, dst, src_off=0, dst_off=0):
        self.fn, self.grid, self.consts = fn, (grid, 1, 1), consts
        self.src, self.dst, self.src_off, self.dst_off = src, dst, src_off, dst_off
        self.num_warps = consts.pop("num_warps")


def rows_steps(shape, *, gated, in_place, src=0, dst=0, src_off=0, dst_off=0, experts=None):
    """Steps moving the rows of ``experts`` experts of a ``[E, rows, K]`` byte array."""
    e, rows, k = shape
    e = e if experts is None else experts
    assert not (in_place and gated), "gated rows cannot move in place"
    ku = k // 4
    bk = _block(ku, 256)
    ng = _batch(rows // 32, 32 * bk)
    grid = e * (rows // (32 * ng)) * triton.cdiv(ku, bk)
    return [Step(_rows_kernel, grid, dict(ROWS=rows, K=ku, BK=bk, NG=ng, GATED=gated,
                                          IN_PLACE=in_place, num_warps=_warps(32 * ng * bk)),
                 src, dst, src_off, dst_off)]


def scales_steps(shape, *, gated, in_place, src=0, dst=0, src_off=0, dst_off=0, experts=None):
    """Steps permuting the rows and swizzling ``experts`` experts of ``[E, rows, C]`` scales."""
    e, rows, c = shape
    e = e if experts is None else experts
    assert not (in_place and gated), "gated scales cannot move in place"
    cu = c // 4
    # In place a program must own its whole tile; otherwise narrower blocks spread the work.
    bc = triton.next_power_of_2(cu) if in_place else _block(cu, 16)
    nt = _batch(rows // 128, 128 * bc)
    grid = e * (rows // (128 * nt)) * triton.cdiv(cu, bc)
    return [Step(_scales_kernel, grid, dict(ROWS=rows, CU=cu, BC=bc, NT=nt, GATED=gated,
                                            IN_PLACE=in_place, num_warps=_warps(128 * nt * bc)),
                 src, dst, src_off, dst_off)]


def copy_steps(nbytes, *, src, dst, src_off=0, dst_off=0):
    n = nbytes // 4
    return [Step(_copy_kernel, triton.cdiv(n, COPY_BLOCK),
                 dict(N=n, BLOCK=COPY_BLOCK, num_warps=8), src, dst, src_off, dst_off)]


def gated_in_place_steps(shape, steps, *, buf, scratch, chunk):
    """``steps(..., gated=True)`` onto buffer ``buf`` itself, ``chunk`` experts at a time:
    moved into ``scratch``, then copied back."""
    e = shape[0]
    per = shape[1] * shape[2]
    out = []
    for start in range(0, e, chunk):
        n = min(chunk, e - start)
        out += steps(shape, gated=True, in_place=False, src=buf, dst=scratch,
                     src_off=start * per, experts=n)
        out += copy_steps(n * per, src=scratch, dst=buf, dst_off=start * per)
    return out


def layer_steps(shapes, *, gated: bool, chunks=None, scratch: int = 4):
    """Every launch that prepares one layer; buffers 0-3 are the four arrays, ``scratch``
    the scratch buffer. ``chunks=None``: out of place (sources 0-3, destinations 4-7)."""
    if chunks is None:
        return (rows_steps(shapes[0], gated=gated, in_place=False, src=0, dst=4)
                + scales_steps(shapes[1], gated=gated, in_place=False, src=1, dst=5)
                + rows_steps(shapes[2], gated=False, in_place=False, src=2, dst=6)
                + scales_steps(shapes[3], gated=False, in_place=False, src=3, dst=7))
    out = []
    for idx, steps in ((0, rows_steps), (1, scales_steps)):
        if gated:
            out += gated_in_place_steps(shapes[idx], steps, buf=idx, scratch=scratch,
                                        chunk=chunks[idx])
        else:
            out += steps(shapes[idx], gated=False, in_place=True, src=idx, dst=idx)
    return (out + rows_steps(shapes[2], gated=False, in_place=True, src=2, dst=2)
            + scales_steps(shapes[3], gated=False, in_place=True, src=3, dst=3))


# Compiled kernels per (function, device, constants): launched without Triton's
# per-call dispatch (argument binding, specialization, cache key: tens of us each).
_compiled: dict = {}
_ARGS_MODE: list = []  # how this Triton's launcher takes arguments, found at first launch


def _views(step, flat):
    return (flat[step.src][step.src_off:].view(torch.int32),
            flat[step.dst][step.dst_off:].view(torch.int32))


def _launch_compiled(step, device, flat, ptrs, stream) -> bool:
    key = (step.fn, device, tuple(sorted(step.consts.items())), step.num_warps)
    kernel = _compiled.get(key)
    if kernel is None:  # compile (no launch) for these constants, pointer types, alignment
        kernel = step.fn.warmup(*_views(step, flat), grid=step.grid,
                                num_warps=step.num_warps, **step.consts)
        _compiled[key] = kernel
    args = (ptrs[step.src] + step.src_off, ptrs[step.dst] + step.dst_off)
    consts = [step.consts[n] for n in step.fn.arg_names[2:]]
    for mode in _ARGS_MODE or ["all", "pointers"]:
        try:  # a launcher given the wrong arguments raises before launching
            kernel[step.grid](*args, *(consts if mode == "all" else ()), stream=stream)
        except TypeError:
            continue
        if not _ARGS_MODE:
            _ARGS_MODE.append(mode)
        return True
    return False


def run_steps(steps, buffers, *, stream=None, device=None) -> None:
    """Launch ``steps`` on ``buffers`` (torch uint8 tensors).

    On CUDA with ``stream`` (a raw CUDA stream handle; ``device`` current) the
    kernels are compiled once per device and then launched directly with raw
    pointers; in Triton's interpreter (CPU) through the usual ``kernel[grid](...)``.
    """
    flat = [b.reshape(-1) for b in buffers]
    ptrs = [b.data_ptr() for b in flat] if stream is not None else None
    for step in steps:
        if stream is not None and _launch_compiled(step, device, flat, ptrs, stream):
            continue
        step.fn[step.grid](*_views(step, flat), num_warps=step.num_warps, **step.consts)
