"""Property tests over E, H, I and gated: the reference layout, and unprepare(prepare(x)) == x."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import jax_nvfp4
from jax_nvfp4 import _reference
from jax_nvfp4._spec import LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax

layers = st.tuples(
    st.integers(1, 5),                    # E
    st.sampled_from([128, 256, 384]),     # H (multiples of 128)
    st.integers(1, 14).map(lambda k: 16 * k),  # I: every multiple of 16, padded or not
    st.booleans(),                        # gated
    st.booleans(),                        # donate
    st.sampled_from([jnp.uint8, jnp.float8_e4m3fn]),  # scale dtype
    st.sampled_from([None, 1, 4096]),     # chunk_bytes: default, 1 expert, a few
)


@settings(max_examples=25, deadline=None)
@given(layers, st.integers(0, 2**32 - 1))
def test_prepare_matches_reference_and_round_trips(params, seed):
    e, h, i, gated, donate, scale_dtype, chunk_bytes = params
    rng = np.random.default_rng(seed)
    layer = random_layer(rng, e, h, i, gated=gated)
    spec = LayerSpec(e, h, i, gated)
    want = _reference.prepare_layer(*layer, gated=gated)

    out = jax_nvfp4.prepare_layer(*to_jax(layer, scale_dtype), gated=gated, donate=donate,
                                  chunk_bytes=chunk_bytes)
    assert [tuple(x.shape) for x in out] == list(spec.shapes(padded=True))
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), out, want):
        assert_bytes_equal(g, w, name)

    back = jax_nvfp4.unprepare_layer(*out, gated=gated, donate=donate, chunk_bytes=chunk_bytes)
    # The inverse restores the (padded) checkpoint layout byte for byte.
    padded = _reference._pad_i(*layer, i, spec.padded_i, gated) if spec.needs_padding else layer
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), back, padded):
        assert_bytes_equal(g, w, f"round trip {name}")
    assert [str(x.dtype) for x in back] == ["uint8", "float8_e4m3fn"] * 2
