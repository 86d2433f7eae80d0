"""Property tests over E, H, I, gated and the H alignment: the reference layout, and
unprepare(prepare(x)) == x (the padded x, or x itself when cropped back)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import jax_nvfp4
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax

layers = st.tuples(
    st.integers(1, 5),                    # E
    st.sampled_from([128, 256, 384]) | st.integers(1, 30).map(lambda k: 16 * k),  # H
    st.integers(1, 14).map(lambda k: 16 * k),  # I: every multiple of 16, padded or not
    st.booleans(),                        # gated
    st.booleans(),                        # donate
    st.sampled_from([jnp.uint8, jnp.float8_e4m3fn]),  # scale dtype
    st.sampled_from([None, 1, 4096]),     # chunk_bytes: default, 1 expert, a few
    st.sampled_from([128, 256, 512]),     # hidden_alignment
)


@settings(max_examples=25, deadline=None)
@given(layers, st.integers(0, 2**32 - 1))
def test_prepare_matches_reference_and_round_trips(params, seed):
    e, h, i, gated, donate, scale_dtype, chunk_bytes, align = params
    rng = np.random.default_rng(seed)
    layer = random_layer(rng, e, h, i, gated=gated)
    spec = LayerSpec(e, h, i, gated, hidden_alignment=align)
    want = _reference.prepare_layer(*layer, gated=gated, hidden_alignment=align)

    out = jax_nvfp4.prepare_layer(*to_jax(layer, scale_dtype), gated=gated, donate=donate,
                                  chunk_bytes=chunk_bytes, hidden_alignment=align)
    assert [tuple(x.shape) for x in out] == list(spec.shapes(padded=True))
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), out, want):
        assert_bytes_equal(g, w, name)

    crop = bool(seed % 2)  # crop the padding back, or keep it
    back = jax_nvfp4.unprepare_layer(*out, gated=gated, donate=donate, chunk_bytes=chunk_bytes,
                                     **(dict(hidden_size=h, intermediate_size=i) if crop else {}))
    # The inverse restores the (padded, unless cropped) checkpoint layout byte for byte.
    padded = layer if crop else _reference.pad_layer(*layer, gated=gated, hidden_alignment=align)
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), back, padded):
        assert_bytes_equal(g, w, f"round trip {name}")
    assert [str(x.dtype) for x in back] == ["uint8", "float8_e4m3fn"] * 2
