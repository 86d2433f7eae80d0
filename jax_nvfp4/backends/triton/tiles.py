"""Tile sizes of the Triton kernels that the plan depends on: when gated w13 moves in place
in one pass, and how much scratch the in-place program needs. Plain Python (no torch or
triton), shared by ``program`` (the plan) and ``kernels`` (the launches)."""

from __future__ import annotations

import functools
import math

import numpy as np

from ...layout.spec import LayerSpec

# Gated w13 moves in place in one pass where one program holds all of an expert's rows
# (rounded up to a power of two, the extra lanes masked) for a block of at least
# WHOLE_MIN_UNITS four-byte columns, TILE_WHOLE units in all: 2I up to 2048. Larger, its
# rows go through scratch (two passes). Measured on an H200, in-place launches alone
# (benchmarks/results/h200-2026-12-03-4bfecaf-triton-tiles.log; copy of the layer in
# brackets): DeepSeek-V3 TP8 (512 rows) 0.488 ms at 16384 units, 0.544 at 32768 [0.387];
# Qwen3-30B-A3B (1536 rows in 2048 lanes) 0.277 one pass vs 0.328 through scratch [0.18];
# DeepSeek-V3 (4096 rows) one pass 5.47 ms (32768 units, 32 bytes a row), 6.72 (16384),
# 5.77 (65536, 32 warps) vs 5.43 through scratch [3.02]: no gain, so 4096 rows keep scratch.
TILE_WHOLE = 16384
WHOLE_MIN_UNITS = 8
WHOLE_WARPS = 16


def whole_rows(rows: int) -> int:
    """The lanes a one-pass program gives ``rows`` rows: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


def whole_rows_fit(rows: int) -> bool:
    """Whether one program can hold all ``rows`` rows of an expert (gated w13 in place):
    at least ``WHOLE_MIN_UNITS`` columns of them in a tile."""
    return whole_rows(rows) * WHOLE_MIN_UNITS <= TILE_WHOLE


def w13_rows(spec: LayerSpec) -> int:
    """Rows of an expert's w13 as prepared (padded): 2I gated, I not."""
    return spec.shapes(padded=True)[0][1]


def w13_in_one_pass(spec: LayerSpec) -> bool:
    """Whether the in-place program moves gated w13 in one pass by whole rows (a program
    holds all of an expert's rows for a few columns; not by cycle groups, not scratch)."""
    return spec.gated and whole_rows_fit(w13_rows(spec)) and not w13_by_cycles(spec)


# Gated w13 also moves in place by the cycles of its row permutation where they are short
# enough: a program holds a *group* of whole cycles (at most ``slots`` rows) for a block of
# columns, reads each row's source and, after a barrier, writes it; one pass. Where 2I is a
# power of two the permutation permutes the bits of the row index and its cycles are at most
# log2(2I) long (4096 rows: 350 cycles, at most 12), so CYCLE_SLOTS rows a group; other sizes
# have longer cycles (1536 rows: 10, at most 204), up to MAX_CYCLE_SLOTS rows a group (those
# sizes fit whole rows too: CYCLES_OVER_WHOLE picks); longer (3072 rows: 1476; 7168:
# 2388) keep scratch.
CYCLE_SLOTS = 16
MAX_CYCLE_SLOTS = 256
# Four-byte units a cycle's program moves: ``CYCLE_TILE // slots`` columns of its rows (a
# power of two). DeepSeek-V3 donated on an H200, 16 slots, one cycle a group
# (benchmarks/results/h200-2026-12-04-a704f69-cycles-sweep.log; floor 3.07 ms): device 5.04 ms
# at 64 columns, 6.61 at 128, 4.66 at 256, 3.81 at 512, 3.98 at 1024; through scratch 5.38.
CYCLE_TILE = 8192
# Whether a layer whose whole rows fit one program (2I up to 2048) moves by cycle groups
# instead, where they exist (wider rows a program than the whole rows' 8-32 units), and
# whether short cycles share a group (fewer programs, fewer idle slots) instead of one cycle
# a group. Timed on an H100, in-place launches alone, against a copy of the layer
# (benchmarks/results/h100-2026-12-07-7a9da43-triton-tiles.log, ms): Qwen3-30B-A3B (1536
# rows) 0.346 by whole rows, 0.273 by cycles (copy 0.249); DeepSeek-V3 TP8 (512 rows) 0.647
# and 0.656 (copy 0.542); packing changed no shape by more than 0.5% at 8192 units (4096:
# 10-13% slower). So cycles over whole rows, one cycle a group.
CYCLES_OVER_WHOLE = True
PACK_CYCLES = False


@functools.lru_cache(maxsize=16)
def _cycles(rows: int) -> list | None:
    """The cycles (longer than one row) of gated w13's row permutation, each ``c0, c1, ...``
    with ``c[k + 1]`` the source of ``c[k]`` (the last's source is ``c0``); None where
    ``rows`` is not a multiple of 32 or a cycle is longer than ``MAX_CYCLE_SLOTS``."""
    if rows % 32 or rows < 32:
        return None
    d = np.arange(rows)
    r, q = d % 32, d // 32
    source = ((r // 8) % 2) * (rows // 2) + 16 * q + 2 * (r % 8) + r // 16
    seen = np.zeros(rows, bool)
    cycles = []
    for start in range(rows):
        if seen[start]:
            continue
        cycle, row = [], start
        while not seen[row]:
            seen[row] = True
            cycle.append(int(row))
            row = source[row]
            if len(cycle) > MAX_CYCLE_SLOTS:
                return None
        if len(cycle) > 1:
            cycles.append(cycle)
    return cycles


def cycle_slots(rows: int) -> int | None:
    """Rows a cycle group holds (a power of two): CYCLE_SLOTS where every cycle fits, else
    the longest cycle's next power of two; None without cycles short enough."""
    cycles = _cycles(rows)
    if not cycles:
        return None
    longest = max(len(c) for c in cycles)
    return CYCLE_SLOTS if longest <= CYCLE_SLOTS else 1 << (longest - 1).bit_length()


def cycle_table(rows: int) -> np.ndarray | None:
    """Gated w13's row permutation (``rows = 2I``; destination row ``d`` takes source row
    ``_reference.w13_row_index(rows)[d]``) as cycle groups: int32 ``[groups, 2, slots]``,
    per group the rows written (``[:, 0]``) and the rows each takes its bytes from
    (``[:, 1]``), -1 in unused slots. Every group is whole cycles (its sources are its own
    rows), packed first fit, longest first; rows that stay are left out. None where
    ``cycle_slots`` is."""
    return _cycle_table(rows, PACK_CYCLES)


@functools.lru_cache(maxsize=16)
def _cycle_table(rows: int, pack: bool) -> np.ndarray | None:
    slots = cycle_slots(rows)
    if slots is None:
        return None
    groups: list[list] = []
    for cycle in sorted(_cycles(rows), key=len, reverse=True):
        group = next((g for g in groups if len(g) + len(cycle) <= slots), None) if pack \
            else None
        if group is None:
            groups.append(group := [])
        group.extend(zip(cycle, cycle[1:] + cycle[:1]))  # (row, its source)
    table = np.full((len(groups), 2, slots), -1, np.int32)
    for k, group in enumerate(groups):
        table[k, :, :len(group)] = np.asarray(group, np.int32).T
    table.setflags(write=False)
    return table


def w13_by_cycles(spec: LayerSpec) -> bool:
    """Whether the in-place program moves gated w13 in one pass by cycle groups
    (``cycle_table``): where they exist, unless its whole rows fit one program and
    ``CYCLES_OVER_WHOLE`` is off."""
    if not spec.gated:
        return False
    rows = w13_rows(spec)
    return (CYCLES_OVER_WHOLE or not whole_rows_fit(rows)) and cycle_table(rows) is not None


def w13_through_scratch(spec: LayerSpec) -> bool:
    """Whether gated w13 goes through the scratch chunk in place (two passes)."""
    return spec.gated and not w13_in_one_pass(spec) and not w13_by_cycles(spec)


def scratch_bytes(spec: LayerSpec, chunks) -> int:
    """Scratch of the in-place program: a chunk of gated w13's scales, and of w13 itself
    where it goes through scratch (0 when not gated: every group is its own source).
    Chunks (experts) are ``chunks[1]`` for the scales alone, else ``chunks[0]``."""
    if not spec.gated or chunks is None:
        return 0
    per = [math.prod(s[1:]) for s in spec.shapes(padded=True)[:2]]
    if not w13_through_scratch(spec):
        return min(chunks[1], spec.experts) * per[1]
    return min(chunks[0], spec.experts) * (per[0] + per[1])
