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


def w13_in_one_pass(spec: LayerSpec) -> bool:
    """Whether the in-place program moves gated w13 in one pass (no scratch for it)."""
    return spec.gated and whole_rows_fit(spec.shapes(padded=True)[0][1])


# Larger gated w13 moves in place by the cycles of its row permutation where they are short:
# a program holds one cycle (at most CYCLE_SLOTS rows) for a block of columns, and writes
# each row with the next one's bytes; one pass. Where 2I is a power of two the permutation
# permutes the bits of the row index and its cycles are at most log2(2I) long (4096 rows:
# 352 cycles, at most 12); other sizes have cycles of thousands of rows: those keep scratch.
CYCLE_SLOTS = 16
# Four-byte columns a cycle's program moves (a power of two). DeepSeek-V3 donated on an H200
# (benchmarks/results/h200-2026-12-04-a704f69-cycles-sweep.log; floor 3.07 ms): device 5.04 ms
# at 64, 6.61 at 128, 4.66 at 256, 3.81 at 512, 3.98 at 1024; through scratch 5.38.
CYCLE_UNITS = 512


@functools.lru_cache(maxsize=16)
def cycle_table(rows: int) -> np.ndarray | None:
    """The cycles of gated w13's row permutation (``rows = 2I``; destination row ``d`` takes
    source row ``_reference.w13_row_index(rows)[d]``) as int32 ``[cycles, CYCLE_SLOTS]``,
    each row ``c0, c1, ...`` with ``c[k + 1]`` the source of ``c[k]`` (the last's source is
    ``c0``), -1 past its end; rows that stay are left out. None where a cycle is longer
    than ``CYCLE_SLOTS`` or ``rows`` is not a multiple of 32."""
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
            cycle.append(row)
            row = source[row]
            if len(cycle) > CYCLE_SLOTS:
                return None
        if len(cycle) > 1:
            cycles.append(cycle + [-1] * (CYCLE_SLOTS - len(cycle)))
    table = np.asarray(cycles, np.int32).reshape(-1, CYCLE_SLOTS)
    table.setflags(write=False)
    return table


def w13_by_cycles(spec: LayerSpec) -> bool:
    """Whether the in-place program moves gated w13 in one pass by its cycles (not one
    program per expert's rows: they do not fit; cycles short enough: ``cycle_table``)."""
    return (spec.gated and not w13_in_one_pass(spec)
            and cycle_table(spec.shapes(padded=True)[0][1]) is not None)


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
