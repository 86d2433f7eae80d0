"""A small MoE forward computes the same from either layout.

Softmax router, top-k experts per token (weights renormalized), gated SiLU
``silu(gate) * up`` with w13 rows ``[up; gate]``, then the down projection.
Scales are drawn from finite float8_e4m3fn values so the outputs are numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
from helpers import random_layer, to_jax
from test_dequantize import unpad


def finite_scales(layer, rng):
    """Replace NaN scale bytes (0x7f, 0xff) by random finite ones, as in a real checkpoint."""
    for k in (1, 3):
        nan = (layer[k] & 0x7F) == 0x7F
        layer[k][nan] = rng.integers(0, 0x7F, size=int(nan.sum()), dtype=np.uint8)
    return layer


def moe(x, router, w13, w2, *, top_k: int):
    """``x`` [T, H], ``router`` [H, E], ``w13`` [E, 2I, H] (rows [up; gate]), ``w2`` [E, H, I]."""
    hi = jax.lax.Precision.HIGHEST
    probs = jax.nn.softmax(jnp.dot(x, router, precision=hi), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)                    # [T, k]
    weights = weights / weights.sum(-1, keepdims=True)
    i = w2.shape[-1]
    h13 = jnp.einsum("th,erh->ter", x, w13, precision=hi)             # every expert, [T, E, 2I]
    act = jax.nn.silu(h13[..., i:]) * h13[..., :i]                    # silu(gate) * up
    out = jnp.einsum("tei,ehi->teh", act, w2, precision=hi)           # [T, E, H]
    combine = jnp.zeros(probs.shape).at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
    return jnp.einsum("te,teh->th", combine, out, precision=hi)


@pytest.mark.parametrize("e, h, i", [(4, 128, 64), (4, 128, 32)])  # I = 32 is padded to 64
def test_forward_is_identical_from_either_layout(rng, e, h, i):
    host = finite_scales(random_layer(rng, e, h, i, gated=True), rng)
    x = jnp.asarray(rng.standard_normal((8, h), dtype=np.float32))
    router = jnp.asarray(rng.standard_normal((h, e), dtype=np.float32))

    linear = jax_nvfp4.dequantize_layer(*to_jax(host))
    prepared = jax_nvfp4.prepare_layer(*to_jax(host))
    trtllm = unpad(*jax_nvfp4.dequantize_layer(*prepared, layout="trtllm"), i, gated=True)
    got = moe(x, router, *trtllm, top_k=2)
    want = moe(x, router, *linear, top_k=2)
    assert np.isfinite(np.asarray(want)).all() and np.abs(np.asarray(want)).max() > 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # The check can fail: prepared bytes read as if linear give another forward.
    copies = [jnp.array(x, copy=True) for x in prepared]  # unmarked copies
    garbage = unpad(*jax_nvfp4.dequantize_layer(*copies), i, gated=True)
    assert not np.allclose(np.asarray(moe(x, router, *garbage, top_k=2)), np.asarray(want))
