"""Tile sizes of the Triton kernels that the plan depends on: when gated w13 moves in place
in one pass, and how much scratch the in-place program needs. Plain Python (no torch or
triton), shared by ``program`` (the plan) and ``kernels`` (the launches)."""

from __future__ import annotations

import math

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


def scratch_bytes(spec: LayerSpec, chunks) -> int:
    """Scratch of the in-place program: a chunk of gated w13's scales, and of w13 itself
    unless it moves in one pass (0 when not gated: every group is its own source).
    Chunks (experts) are ``chunks[1]`` for the scales alone, else ``chunks[0]``."""
    if not spec.gated or chunks is None:
        return 0
    per = [math.prod(s[1:]) for s in spec.shapes(padded=True)[:2]]
    if w13_in_one_pass(spec):
        return min(chunks[1], spec.experts) * per[1]
    return min(chunks[0], spec.experts) * (per[0] + per[1])
