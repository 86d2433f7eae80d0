"""The xla backend on a CUDA GPU: bytes against the reference, float8 in place, one chunk of scratch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jax_nvfp4
from jax_nvfp4 import transform as _prepare
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.layout.spec import SCALE_DTYPE, LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("e, h, i, gated", [(1, 128, 64, True), (4, 256, 96, True),
                                            (3, 384, 256, False), (8, 7168, 256, True),
                                            (2, 7168, 2048, True)])
@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("scale_dtype", [jnp.uint8, jnp.float8_e4m3fn])
def test_prepare_on_gpu_equals_reference(rng, e, h, i, gated, donate, scale_dtype):
    layer = random_layer(rng, e, h, i, gated=gated)
    arrays = to_jax(layer, scale_dtype)
    assert arrays[0].devices().pop().platform == "gpu"
    out = jax_nvfp4.prepare_layer(*arrays, gated=gated, donate=donate, backend="xla",
                                  chunk_bytes=1 << 20)
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), out,
                          _reference.prepare_layer(*layer, gated=gated)):
        assert_bytes_equal(g, w, name)
    back = jax_nvfp4.unprepare_layer(*out, gated=gated, donate=donate, chunk_bytes=1 << 20,
                                     hidden_size=h, intermediate_size=i)  # padding cropped
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), back, layer):
        assert_bytes_equal(g, w, f"round trip {name}")


@pytest.mark.parametrize("e, h, i, gated", [(32, 7168, 2048, True), (64, 7168, 256, True),
                                            (16, 2048, 768, False)])
@pytest.mark.parametrize("chunk_bytes", [None, 16 << 20])
@pytest.mark.parametrize("pallas", [False, True])
def test_float8_program_is_in_place_with_one_chunk_of_scratch(e, h, i, gated, chunk_bytes,
                                                              pallas):
    """GPU keeps float8 data movement in float8 (the CPU backend upcasts to f16)."""
    spec = LayerSpec(e, h, i, gated)
    chunks = _prepare.experts_per_chunk(spec, chunk_bytes)
    args = [jax.ShapeDtypeStruct(s, d) for s, d in
            zip(spec.shapes(padded=False), (jnp.uint8, SCALE_DTYPE) * 2)]
    compiled = _prepare.compiled(spec, inverse=False, donate=True, chunks=chunks,
                                 pallas=pallas).lower(*args).compile()
    stats = compiled.memory_analysis()
    largest_chunk = max(c * s[1] * s[2] for c, s in zip(chunks, spec.shapes(padded=False)))
    assert stats.alias_size_in_bytes == spec.nbytes
    assert stats.temp_size_in_bytes <= largest_chunk + (1 << 16), (stats.temp_size_in_bytes,
                                                                  largest_chunk)
    assert "f16" not in compiled.as_text()
