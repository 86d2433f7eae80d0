"""The TRT-LLM layout as Triton kernels (imported only by ``program``: needs torch and triton).

Every array is moved in units of 4 bytes (int32 pointers to the uint8 / float8
bytes), and every offset is 64-bit, so arrays of any size work. A
program owns one *group* of destination rows, which is where the layout's
permutations close:

* weights: 32 destination rows (one epilogue-tile shuffle group) x ``bk`` units;
* scales: one 128-row swizzle tile x ``bc`` units (rows and swizzle fused).

It loads the group's source elements (gathered by the index formulas of
``_layout``, contiguous along the row), then stores them contiguously. Where the
source of a group is the group itself (not gated: shuffle groups map onto
themselves, and so do whole swizzle tiles), the same kernel works in place: the
barrier between load and store makes every read happen before any write. Gated
w13 mixes the two halves, so its closed sets are whole cycles of its row permutation:
in place a program takes a group of whole cycles of its row permutation (up to 256 rows:
``tiles.cycle_table``) for a block of columns, reads each row's source and writes it, where
the cycles are that short (2I a power of two; 512 and 1536 rows); else all of an expert's
rows for a few columns where they fit (2I up to 2048; ``tiles.CYCLES_OVER_WHOLE`` off
prefers these); otherwise w13 goes through a scratch chunk, as its scales always do
(``layer_launches``).

One launch runs up to four such *segments* (arrays, or chunks of them): program
ids are split between them, so small arrays share a launch instead of each
paying a launch and a tail.
"""

from __future__ import annotations

import contextlib
import linecache
import threading
import warnings

import torch
import triton
import triton.language as tl

from . import tiles


@triton.jit
def _place(pid, ROWS: tl.constexpr, COLS: tl.constexpr, BCOLS: tl.constexpr, N: tl.constexpr,
           GROUP: tl.constexpr):
    """Program ``pid``'s work: its expert, the group (of ``GROUP`` rows) of each of its
    ``N * GROUP`` rows, each row's place in its group, and its ``BCOLS`` columns."""
    ncb: tl.constexpr = (COLS + BCOLS - 1) // BCOLS
    blocks: tl.constexpr = ROWS // (GROUP * N)
    g = pid // ncb
    t = tl.arange(0, GROUP * N)
    return (g // blocks, (g % blocks) * N + t // GROUP, t % GROUP,
            (pid % ncb) * BCOLS + tl.arange(0, BCOLS))


@triton.jit
def _source(src, e, row, k, HALF: tl.constexpr, SHALF: tl.constexpr, HALVES: tl.constexpr,
            K: tl.constexpr, SK: tl.constexpr):
    # Rows ``row`` (of the padded array: HALVES halves of HALF rows) x columns ``k`` (of K
    # units) of expert ``e``, read from the unpadded source (halves of SHALF rows, SK
    # units a row): zeros where the padding is, as vLLM pads before the layout.
    if SHALF == HALF and SK == K:
        return tl.load(src + e.to(tl.int64) * (HALVES * HALF * K) + row.to(tl.int64)[:, None] * K
                       + k[None, :], mask=(k < K)[None, :])
    h = row // HALF
    x = row % HALF
    off = e.to(tl.int64) * (HALVES * SHALF * SK) + (h * SHALF + x).to(tl.int64)[:, None] * SK \
        + k[None, :]
    return tl.load(src + off, mask=(x < SHALF)[:, None] & (k < SK)[None, :], other=0)


@triton.jit
def _rows(src, dst, pid, ROWS: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
          NG: tl.constexpr, GATED: tl.constexpr, IN_PLACE: tl.constexpr, SHALF: tl.constexpr,
          SK: tl.constexpr):
    # One program: NG shuffle groups (32 destination rows each) x BK units of one expert.
    e, q, r, k = _place(pid, ROWS, K, BK, NG, 32)
    if GATED:  # destination row 32q + 16j + 8h + u <- source h * I + 16q + 2u + j
        src_row = ((r // 8) % 2) * (ROWS // 2) + 16 * q + 2 * (r % 8) + r // 16
    else:  # destination row 32q + 8b + c <- source 32q + 4c + b
        src_row = 32 * q + 4 * (r % 8) + r // 8
    x = _source(src, e, src_row, k, ROWS // 2 if GATED else ROWS, SHALF, 2 if GATED else 1,
                K, SK)
    if IN_PLACE:
        tl.debug_barrier()  # every read of the groups before any write
    dst_row = 32 * q + r
    tl.store(dst + e.to(tl.int64) * (ROWS * K) + dst_row.to(tl.int64)[:, None] * K + k[None, :],
             x, mask=(k < K)[None, :])


@triton.jit
def _whole(buf, pid, ROWS: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
    # Gated w13 in place: one program holds every row of one expert (ROWS, in RP lanes, a
    # power of two) for BK units, the interleave's only closed set, and writes it back
    # permuted: one pass over w13.
    ncb: tl.constexpr = (K + BK - 1) // BK
    e = pid // ncb
    k = (pid % ncb) * BK + tl.arange(0, BK)
    d = tl.arange(0, RP)
    q = d // 32
    r = d % 32
    src_row = ((r // 8) % 2) * (ROWS // 2) + 16 * q + 2 * (r % 8) + r // 16
    base = buf + e.to(tl.int64) * (ROWS * K)
    mask = (d < ROWS)[:, None] & (k < K)[None, :]
    x = tl.load(base + src_row.to(tl.int64)[:, None] * K + k[None, :], mask=mask)
    tl.debug_barrier()  # every read of the strip before any write
    tl.store(base + d.to(tl.int64)[:, None] * K + k[None, :], x, mask=mask)


@triton.jit
def _cycles(table, buf, pid, ROWS: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
            NGROUPS: tl.constexpr, SLOTS: tl.constexpr):
    # Gated w13 in place, one group of whole cycles of its row permutation
    # (``tiles.cycle_table``: SLOTS rows written, then the SLOTS rows they take, -1 unused)
    # x BK units of one expert. The sources are the group's own rows: one pass over w13.
    ncb: tl.constexpr = (K + BK - 1) // BK
    e = pid // (NGROUPS * ncb)
    j = (pid // ncb) % NGROUPS
    k = (pid % ncb) * BK + tl.arange(0, BK)
    slot = tl.arange(0, SLOTS)
    here = tl.load(table + (2 * j) * SLOTS + slot)
    there = tl.load(table + (2 * j + 1) * SLOTS + slot)
    base = buf + e.to(tl.int64) * (ROWS * K)
    mask = (here >= 0)[:, None] & (k < K)[None, :]
    x = tl.load(base + there.to(tl.int64)[:, None] * K + k[None, :], mask=mask)
    tl.debug_barrier()  # every read of the group before any write
    tl.store(base + here.to(tl.int64)[:, None] * K + k[None, :], x, mask=mask)


@triton.jit
def _scales(src, dst, pid, ROWS: tl.constexpr, CU: tl.constexpr, BC: tl.constexpr,
            NT: tl.constexpr, GATED: tl.constexpr, IN_PLACE: tl.constexpr, SHALF: tl.constexpr,
            SCU: tl.constexpr):
    # One program: NT swizzle tiles (128 rows each) x BC units of one expert. t: the place
    # in the tile's 128 x 4 block, (b, c, a0) or (j, h, u, q0).
    e, a, t, cu = _place(pid, ROWS, CU, BC, NT, 128)
    if GATED:  # t = 64j + 32h + 4u + q0 <- source row h * I + 64a + 16q0 + 2u + j
        src_row = ((t // 32) % 2) * (ROWS // 2) + 64 * a + 16 * (t % 4) + 2 * ((t // 4) % 8) \
            + t // 64
    else:  # t = 32b + 4c + a0 <- source row 128a + 32a0 + 4c + b
        src_row = 128 * a + 32 * (t % 4) + 4 * ((t // 4) % 8) + t // 32
    x = _source(src, e, src_row, cu, ROWS // 2 if GATED else ROWS, SHALF, 2 if GATED else 1,
                CU, SCU)
    if IN_PLACE:
        tl.debug_barrier()
    dst_off = e.to(tl.int64) * (ROWS * CU) + a.to(tl.int64)[:, None] * (128 * CU) \
        + cu[None, :].to(tl.int64) * 128 + t[:, None]
    tl.store(dst + dst_off, x, mask=(cu < CU)[None, :])


@triton.jit
def _copy(src, dst, pid, N: tl.constexpr, BLOCK: tl.constexpr):
    # dst[:N] = src[:N]: the copy back from scratch.
    off = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < N
    tl.store(dst + off, tl.load(src + off, mask=mask), mask=mask)


@triton.jit
def _segment(src, dst, pid, KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
             C: tl.constexpr, D: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
             S: tl.constexpr, T: tl.constexpr):
    if KIND == 0:
        _rows(src, dst, pid, A, B, C, D, G, P, S, T)
    elif KIND == 1:
        _scales(src, dst, pid, A, B, C, D, G, P, S, T)
    elif KIND == 3:
        _whole(dst, pid, A, B, C, D)
    elif KIND == 4:
        _cycles(src, dst, pid, A, B, C, D, G)
    else:
        _copy(src, dst, pid, A, B)


@triton.jit
def _layer_kernel(s0, d0, s1, d1, s2, d2, s3, d3,
                  N0: tl.constexpr, KIND0: tl.constexpr, A0: tl.constexpr, B0: tl.constexpr,
                  C0: tl.constexpr, D0: tl.constexpr, G0: tl.constexpr, P0: tl.constexpr,
                  S0: tl.constexpr, T0: tl.constexpr,
                  N1: tl.constexpr, KIND1: tl.constexpr, A1: tl.constexpr, B1: tl.constexpr,
                  C1: tl.constexpr, D1: tl.constexpr, G1: tl.constexpr, P1: tl.constexpr,
                  S1: tl.constexpr, T1: tl.constexpr,
                  N2: tl.constexpr, KIND2: tl.constexpr, A2: tl.constexpr, B2: tl.constexpr,
                  C2: tl.constexpr, D2: tl.constexpr, G2: tl.constexpr, P2: tl.constexpr,
                  S2: tl.constexpr, T2: tl.constexpr,
                  N3: tl.constexpr, KIND3: tl.constexpr, A3: tl.constexpr, B3: tl.constexpr,
                  C3: tl.constexpr, D3: tl.constexpr, G3: tl.constexpr, P3: tl.constexpr,
                  S3: tl.constexpr, T3: tl.constexpr):
    # Program ids [0, N0) run segment 0, the next N1 segment 1, and so on.
    pid = tl.program_id(0)
    if N0 > 0:
        if pid < N0:
            _segment(s0, d0, pid, KIND0, A0, B0, C0, D0, G0, P0, S0, T0)
    if N1 > 0:
        if (pid >= N0) & (pid < N0 + N1):
            _segment(s1, d1, pid - N0, KIND1, A1, B1, C1, D1, G1, P1, S1, T1)
    if N2 > 0:
        if (pid >= N0 + N1) & (pid < N0 + N1 + N2):
            _segment(s2, d2, pid - N0 - N1, KIND2, A2, B2, C2, D2, G2, P2, S2, T2)
    if N3 > 0:
        if pid >= N0 + N1 + N2:
            _segment(s3, d3, pid - N0 - N1 - N2, KIND3, A3, B3, C3, D3, G3, P3, S3, T3)


ROWS, SCALES, COPY, WHOLE, CYCLES = 0, 1, 2, 3, 4
# Units (4 bytes) a program moves at most: small rows are batched into larger programs.
TILE_UNITS = 8192
COPY_BLOCK = 8192
SEGMENTS = 4


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


def _block(k: int, most: int) -> int:
    """Columns per program: a power-of-two divisor of ``k`` (no masked lanes) unless
    that is narrow, then the next power of two over ``k`` (masked), at most ``most``."""
    d = _pow2_divisor(k, most)
    return d if d >= min(32, most) or d == k else min(most, triton.next_power_of_2(k))


def warps(units: int) -> int:
    """Warps of a program that moves ``units`` four-byte units."""
    return 16 if units >= 16384 else 8 if units >= 8192 else 4


class Segment:
    """One array's (or chunk's) work in a launch: ``programs`` programs of ``kind`` from
    buffer ``src`` to ``dst`` (indices into the call's buffers) at byte offsets."""

    def __init__(self, kind, programs, consts, units, src, dst, src_off=0, dst_off=0,
                 num_warps=None):
        self.kind, self.programs = kind, programs
        self.consts = consts  # (A, B, C, D, G, P, S, T): see _segment
        self.warps = num_warps or warps(units)
        self.src, self.dst, self.src_off, self.dst_off = src, dst, src_off, dst_off


def _source_geometry(shape, source, *, gated):
    """``(SHALF, SK)``: rows per half (gated) or rows, and 4-byte units per row, of the
    unpadded ``source`` of a padded ``shape`` (``source=None``: not padded)."""
    e, r, k = source or shape
    assert k % 4 == 0, f"a row of {k} bytes cannot be read in 4-byte units"
    return (r // 2 if gated else r), k // 4


def rows(shape, *, gated, in_place, src=0, dst=0, src_off=0, dst_off=0, experts=None,
         source=None):
    """Moving the rows of ``experts`` experts of a ``[E, rows, K]`` byte array (out of
    place: read from ``source``, its unpadded shape, where it is padded).

    Gated and in place, a program holds all of an expert's rows for its block of
    columns (the interleave's only closed set): ``tiles.w13_in_one_pass`` says when.
    """
    e, r, k = shape
    e = e if experts is None else experts
    ku = k // 4
    if in_place and gated:
        assert tiles.whole_rows_fit(r) and source is None, "gated rows cannot move in place"
        rp = tiles.whole_rows(r)
        bk = max(tiles.WHOLE_MIN_UNITS, _block(ku, tiles.TILE_WHOLE // rp))
        return Segment(WHOLE, e * triton.cdiv(ku, bk), (r, ku, bk, rp, True, True, 0, 0),
                       rp * bk, src, dst, src_off, dst_off, num_warps=tiles.WHOLE_WARPS)
    bk = _block(ku, 256)
    ng = _batch(r // 32, 32 * bk)
    return Segment(ROWS, e * (r // (32 * ng)) * triton.cdiv(ku, bk),
                   (r, ku, bk, ng, gated, in_place, *_source_geometry(shape, source, gated=gated)),
                   32 * ng * bk, src, dst, src_off, dst_off)


def cycles(shape, *, table, dst, ngroups):
    """Gated ``[E, rows, K]`` w13 in place by groups of cycles of its row permutation:
    buffer ``table`` holds ``tiles.cycle_table(rows)`` (``ngroups`` groups), ``dst`` the
    array."""
    e, r, k = shape
    ku = k // 4
    slots = tiles.cycle_slots(r)
    bk = min(tiles.CYCLE_TILE // slots, triton.next_power_of_2(ku))
    return Segment(CYCLES, e * ngroups * triton.cdiv(ku, bk),
                   (r, ku, bk, ngroups, slots, True, 0, 0), slots * bk, table, dst)


def scales(shape, *, gated, in_place, src=0, dst=0, src_off=0, dst_off=0, experts=None,
           source=None):
    """Permuting the rows and swizzling ``experts`` experts of ``[E, rows, C]`` scales (out
    of place: read from ``source``, their unpadded shape, where they are padded)."""
    e, r, c = shape
    e = e if experts is None else experts
    assert not (in_place and gated), "gated scales cannot move in place"
    cu = c // 4
    # In place a program must own its whole tile; otherwise narrower blocks spread the work.
    bc = triton.next_power_of_2(cu) if in_place else _block(cu, 16)
    nt = _batch(r // 128, 128 * bc)
    return Segment(SCALES, e * (r // (128 * nt)) * triton.cdiv(cu, bc),
                   (r, cu, bc, nt, gated, in_place, *_source_geometry(shape, source, gated=gated)),
                   128 * nt * bc, src, dst, src_off, dst_off)


def copy(nbytes, *, src, dst, src_off=0, dst_off=0):
    """``nbytes`` (a multiple of 4) copied from ``src`` to ``dst``."""
    n = nbytes // 4
    return Segment(COPY, triton.cdiv(n, COPY_BLOCK), (n, COPY_BLOCK, 0, 0, False, False, 0, 0),
                   COPY_BLOCK, src, dst, src_off, dst_off)


def layer_launches(shapes, *, gated: bool, chunk=None, w13_one_pass: bool = False,
                   w13_cycles: int = 0, sources=None):
    """Every launch (a tuple of segments) that prepares one layer of padded ``shapes``.

    Buffers: out of place (``chunk=None``) 0-3 are the sources and 4-7 the
    destinations; ``sources``: the shapes the sources have (unpadded: the padding is
    written as zeros on the way; default ``shapes``). In place 0-3 are the arrays and 4
    the scratch, which holds ``chunk`` experts of gated w13 and then of their scales, or
    of the scales alone with ``w13_one_pass`` or ``w13_cycles`` (``tiles.scratch_bytes``);
    ``w13_cycles``: the number of cycle groups of w13's row permutation, their table in buffer
    5 (``tiles.cycle_table``), gated w13 moved by them. In place, the arrays that move in
    one pass run beside the first chunk.
    """
    if chunk is None:
        src = [None if s is None or tuple(s) == tuple(p) else tuple(s)
               for s, p in zip(sources or shapes, shapes)]
        return [(rows(shapes[0], gated=gated, in_place=False, src=0, dst=4, source=src[0]),
                 scales(shapes[1], gated=gated, in_place=False, src=1, dst=5, source=src[1]),
                 rows(shapes[2], gated=False, in_place=False, src=2, dst=6, source=src[2]),
                 scales(shapes[3], gated=False, in_place=False, src=3, dst=7, source=src[3]))]
    tail = (rows(shapes[2], gated=False, in_place=True, src=2, dst=2),
            scales(shapes[3], gated=False, in_place=True, src=3, dst=3))
    if not gated:
        return [(rows(shapes[0], gated=False, in_place=True, src=0, dst=0),
                 scales(shapes[1], gated=False, in_place=True, src=1, dst=1), *tail)]
    e = shapes[0][0]
    per = [s[1] * s[2] for s in shapes[:2]]
    through = (1,) if w13_one_pass or w13_cycles else (0, 1)  # through scratch, in order
    if w13_one_pass:
        tail = (rows(shapes[0], gated=True, in_place=True, src=0, dst=0), *tail)
    elif w13_cycles:
        tail = (cycles(shapes[0], table=5, dst=0, ngroups=w13_cycles), *tail)
    out = []
    for start in range(0, e, chunk):
        n = min(chunk, e - start)
        gather, back, off = [], [], 0
        for idx in through:
            move = rows if idx == 0 else scales
            gather.append(move(shapes[idx], gated=True, in_place=False, src=idx, dst=4,
                               src_off=start * per[idx], dst_off=off, experts=n))
            back.append(copy(n * per[idx], src=4, dst=idx, src_off=off,
                             dst_off=start * per[idx]))
            off += n * per[idx]
        out.append((*gather, *(tail if start == 0 else ())))
        out.append(tuple(back))
    return out


def _consts(launch) -> dict:
    out = {}
    for i in range(SEGMENTS):
        seg = launch[i] if i < len(launch) else None
        values = (seg.programs, seg.kind, *seg.consts) if seg else (0, COPY, 0, 128, 0, 0,
                                                                     False, False, 0, 0)
        for name, v in zip(("N", "KIND", "A", "B", "C", "D", "G", "P", "S", "T"), values):
            out[f"{name}{i}"] = v
    return out


class Launch:
    """A planned launch: its segments, grid and compile-time constants."""

    def __init__(self, segments):
        assert 1 <= len(segments) <= SEGMENTS
        self.segments = segments
        self.grid = (sum(s.programs for s in segments), 1, 1)
        self.consts = _consts(segments)
        self.warps = max(s.warps for s in segments)
        self.key = (tuple(sorted(self.consts.items())), self.warps)
        self.const_args = [self.consts[n] for n in _layer_kernel.arg_names[2 * SEGMENTS:]]
        self.runners = {}  # device -> the compiled kernel's launcher for this grid

    def pointers(self, ptrs):
        out = []
        for i in range(SEGMENTS):
            s = self.segments[min(i, len(self.segments) - 1)]
            out += [ptrs[s.src] + s.src_off, ptrs[s.dst] + s.dst_off]
        return out

    def views(self, flat):
        out = []
        for i in range(SEGMENTS):
            s = self.segments[min(i, len(self.segments) - 1)]
            out += [flat[s.src][s.src_off:].view(torch.int32),
                    flat[s.dst][s.dst_off:].view(torch.int32)]
        return out


def plan(launches) -> list[Launch]:
    """``layer_launches``' tuples of segments as :class:`Launch` objects."""
    return [Launch(segs) for segs in launches]


# Compiled kernels per (device, constants): launched without Triton's per-call
# dispatch (argument binding, specialization, cache key: tens of us each).
_compiled: dict = {}
_ARGS_MODE: list = []  # how this Triton's launcher takes arguments, found at first launch
# XLA runs each device's callback on its own thread; Triton's compiler and its
# interpreter are not thread-safe (both rewrite Python ASTs).
_lock = threading.Lock()


def _launch_direct(launch, device, ptrs, stream) -> bool:
    runner = launch.runners.get(device)
    if runner is None:
        kernel = _compiled.get((device, launch.key))
        if kernel is None:  # compile (no launch): int32 pointers, 16-byte aligned
            with _lock:
                kernel = _layer_kernel.warmup(*[torch.int32] * (2 * SEGMENTS), grid=launch.grid,
                                              num_warps=launch.warps, **launch.consts)
            _compiled[(device, launch.key)] = kernel
        runner = launch.runners[device] = kernel[launch.grid]
    args = launch.pointers(ptrs)
    for mode in _ARGS_MODE or ["all", "pointers"]:
        try:  # a launcher given the wrong arguments raises before launching
            runner(*args, *(launch.const_args if mode == "all" else ()), stream=stream)
        except TypeError:
            continue
        if not _ARGS_MODE:
            _ARGS_MODE.append(mode)
        return True
    return False


# False once a direct launch failed in this process: Triton's usual dispatch from then on.
_DIRECT = [True]


def _launch_dispatch(launch, flat, stream) -> None:
    """``kernel[grid](tensors...)``: Triton's own dispatch (and its interpreter on CPU)."""
    with _lock, contextlib.ExitStack() as stack:
        if stream is not None:
            stack.enter_context(torch.cuda.stream(torch.cuda.ExternalStream(stream)))
        _layer_kernel[launch.grid](*launch.views(flat), num_warps=launch.warps, **launch.consts)


def run(launches, *, tensors, pointers=None, stream=None, device=None) -> None:
    """Run planned ``launches`` on the call's buffers.

    On CUDA give ``pointers`` (device addresses), the raw ``stream`` handle and the
    ``device`` index (current): kernels are compiled once per device and launched
    directly. ``tensors`` (a callable returning the buffers as torch uint8 tensors)
    serves Triton's interpreter on CPU, and CUDA where the direct launch fails (it
    goes through Triton's internals, which change between versions).
    """
    flat = None
    for launch in launches:
        if pointers is not None and _DIRECT[0]:
            try:
                if _launch_direct(launch, device, pointers, stream):
                    continue
                reason = "its launcher takes arguments in an unknown way"
            except Exception as e:  # noqa: BLE001 - any failure before the launch
                reason = repr(e)
            _DIRECT[0] = False
            warnings.warn(f"jax_nvfp4: launching Triton kernels directly failed ({reason}); "
                          "using Triton's usual dispatch (same bytes, more host time)",
                          RuntimeWarning, stacklevel=2)
        if flat is None:
            flat = [t.reshape(-1) for t in tensors()]
        _launch_dispatch(launch, flat, stream)


# --- Launches through XLA (jax-triton's custom call) ----------------------------------------
# XLA launches the compiled kernel itself (jaxlib's "triton_kernel_call" target): no Python
# callback, no host work per call. Its kernel parameters are the call's buffers in order
# (operands, then results, aliased or not) after the scalars, which come first here; a buffer's place in the plan
# (``Segment.src``/``dst``) is mapped onto those by compile-time indices (X0..X7), and the
# byte offsets of chunks come as runtime scalars in 16-byte units (so the compiler still
# knows every pointer is 16-byte aligned and keeps vector accesses).

@triton.jit
def _pick(i: tl.constexpr, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9):
    # Buffer i, chosen at compile time (a conditional on a constexpr is static in Triton).
    p = (b0 if i == 0 else b1 if i == 1 else b2 if i == 2 else b3 if i == 3 else b4 if i == 4
         else b5 if i == 5 else b6 if i == 6 else b7 if i == 7 else b8 if i == 8 else b9)
    return p.to(tl.pointer_type(tl.int32))


# One kernel per number of buffers a call has (a Triton kernel's parameters are fixed):
# 2 = one array out of place (``array_programs``), 8 = four operands + four results (out
# of place, or in place without scratch), 9 = the first in-place call (its results: the
# four arrays aliased, then the new scratch), 10 = later in-place calls (four arrays and the
# scratch, operands aliased to results), or the first with w13 by cycles (the four arrays
# and the cycle table, then the four aliased and the new scratch).
# Only the parameter lists differ, so each is generated from one template: the offsets,
# the call's buffers, X0..X7 (which buffer each of _layer_kernel's eight pointers is), then
# _layer_kernel's constants. The buffers a call lacks are b0 in _pick (never picked).
_LAYER_CONSTS = _layer_kernel.arg_names[2 * SEGMENTS:]


def _xla_kernel(n: int):
    """The ``n``-buffer kernel: ``_xla{n}(o0..o7, b0..b{n-1}, X0..X7, N0, KIND0, ...)``."""
    offsets, buffers = [f"o{j}" for j in range(8)], [f"b{j}" for j in range(n)]
    picks = [f"X{j}" for j in range(8)]
    consts = picks + _LAYER_CONSTS
    ten = ", ".join(buffers + ["b0"] * (10 - n))
    pointers = [f"_pick({x}, {ten}) + {o}.to(tl.int64) * 4" for x, o in zip(picks, offsets)]
    name = f"_xla{n}"
    src = (f"def {name}({', '.join(offsets + buffers)}, "
           f"{', '.join(f'{c}: tl.constexpr' for c in consts)}):\n"
           f"    _layer_kernel({', '.join(pointers + _LAYER_CONSTS)})\n")
    # Triton reads a kernel's source (inspect.getsource): keep it where linecache finds it.
    filename = f"<jax_nvfp4.backends.triton.kernels.{name}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
    scope = {"tl": tl, "_pick": _pick, "_layer_kernel": _layer_kernel, "__name__": __name__}
    exec(compile(src, filename, "exec", flags=annotations.compiler_flag, dont_inherit=True),
         scope)
    return triton.jit(scope[name])


XLA_KERNELS = {n: _xla_kernel(n) for n in (2, 8, 9, 10)}


def xla_call_args(launch: Launch, places) -> tuple[list[int], dict]:
    """The scalar offsets (16-byte units) and compile-time constants of ``launch`` as one
    XLA call whose kernel parameters hold the plan's buffer ``b`` at ``places[b]``."""
    offsets, consts = [], dict(launch.consts)
    for i in range(SEGMENTS):
        s = launch.segments[min(i, len(launch.segments) - 1)]
        for j, (buf, off) in enumerate(((s.src, s.src_off), (s.dst, s.dst_off))):
            # jax-triton turns a scalar equal to 1 into a constant: 16 bytes is no chunk
            # boundary (experts are at least 1 KiB), so it never occurs.
            assert off % 16 == 0 and off != 16, off
            offsets.append(off // 16)
            consts[f"X{2 * i + j}"] = places[buf]
    return offsets, consts
