"""Synthetic NVFP4 MoE data for tests, examples and benchmarks (no downloads)."""

from __future__ import annotations

import numpy as np

from ._spec import LayerSpec


def random_layer(rng: np.random.Generator, experts: int, hidden: int, intermediate: int, *,
                 gated: bool = True) -> list[np.ndarray]:
    """Random bytes shaped like one MoE layer in the checkpoint layout.

    Returns numpy uint8 ``[w13_weight, w13_weight_scale, w2_weight, w2_weight_scale]``
    with shapes ``[E, R1, H/2]``, ``[E, R1, H/16]``, ``[E, H, I/2]``, ``[E, H, I/16]``
    (``R1 = 2I`` when gated). Scale bytes are arbitrary float8_e4m3fn bit patterns;
    view them with ``.view(ml_dtypes.float8_e4m3fn)``.
    """
    spec = LayerSpec(experts, hidden, intermediate, gated)
    return [rng.integers(0, 256, size=s, dtype=np.uint8) for s in spec.shapes(padded=False)]
