"""JAX owns the buffers: donated inputs are consumed and updated in place, one chunk of scratch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jax_nvfp4
from jax_nvfp4 import options, transform as _prepare
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax


def test_donated_inputs_are_deleted_and_outputs_reuse_their_buffers(rng):
    layer = to_jax(random_layer(rng, 4, 256, 128))
    pointers = [x.unsafe_buffer_pointer() for x in layer]
    out = jax_nvfp4.prepare_layer(*layer, chunk_bytes=8192)
    assert all(x.is_deleted() for x in layer)
    assert [x.unsafe_buffer_pointer() for x in out] == pointers
    back = jax_nvfp4.unprepare_layer(*out, chunk_bytes=8192)
    assert all(x.is_deleted() for x in out)
    assert [x.unsafe_buffer_pointer() for x in back] == pointers


def test_without_donation_inputs_stay_valid(rng):
    host = random_layer(rng, 3, 128, 64)
    layer = to_jax(host)
    out = jax_nvfp4.prepare_layer(*layer, donate=False)
    assert not any(x.is_deleted() for x in layer)
    for x, h in zip(layer, host):
        assert_bytes_equal(x, h)
    assert all(not o.is_deleted() for o in out)


@pytest.mark.parametrize("h, i, align, hp, ip", [
    (128, 96, 128, 128, 128),   # I = 96 is padded to 128
    (128, 128, 256, 256, 128),  # H = 128 is padded to 256 (the default alignment)
    (208, 96, 256, 256, 128),   # both
])
def test_padded_layer_consumes_its_inputs(rng, h, i, align, hp, ip):
    layer = to_jax(random_layer(rng, 2, h, i))
    out = jax_nvfp4.prepare_layer(*layer, hidden_alignment=align)
    assert all(x.is_deleted() for x in layer)
    assert out[0].shape == (2, 2 * ip, hp // 2) and out[2].shape == (2, hp, ip // 2)
    back = jax_nvfp4.unprepare_layer(*out, hidden_size=h, intermediate_size=i)  # cropped
    assert all(x.is_deleted() for x in out)
    assert back[0].shape == (2, 2 * i, h // 2) and back[3].shape == (2, h, i // 16)


@pytest.mark.parametrize("e, h, i, gated", [(16, 512, 256, True), (12, 256, 384, False)])
@pytest.mark.parametrize("chunk_bytes", [1, 64 << 10])
def test_scratch_is_one_chunk(e, h, i, gated, chunk_bytes):
    """memory_analysis of the donated program: everything aliased, scratch <= one chunk.

    uint8 scales here: XLA's CPU backend computes float8 data movement in float16
    (a full copy), which the GPU backend does not; test_gpu checks float8 there.
    """
    spec = LayerSpec(e, h, i, gated)
    chunks = _prepare.experts_per_chunk(spec, chunk_bytes)
    args = [jax.ShapeDtypeStruct(s, jnp.uint8) for s in spec.shapes(padded=False)]
    stats = _prepare.compiled(spec, inverse=False, donate=True, chunks=chunks).lower(*args).compile().memory_analysis()
    largest_chunk = max(c * s[1] * s[2] for c, s in zip(chunks, spec.shapes(padded=False)))
    assert stats.alias_size_in_bytes == spec.nbytes
    assert stats.temp_size_in_bytes <= largest_chunk + 16384  # + the loop's bookkeeping
    assert stats.temp_size_in_bytes < spec.nbytes / 8  # one chunk, not one layer


def test_chunks_follow_the_budget():
    spec = LayerSpec(256, 7168, 2048, True)
    per_expert_w13 = 4096 * 3584
    assert _prepare.experts_per_chunk(spec, 1)[0] == 1
    assert _prepare.experts_per_chunk(spec, 10**12) == (256,) * 4
    c = _prepare.experts_per_chunk(spec, 16 * per_expert_w13)[0]
    assert c == 16
    # the default stays a small share of the layer
    default = _prepare.experts_per_chunk(spec, None)[0]
    assert default * per_expert_w13 <= spec.nbytes / 16


def test_default_chunk_follows_free_memory():
    spec = LayerSpec(256, 7168, 2048, True)
    roomy = _prepare.default_chunk_bytes(spec, free=10**12)
    assert roomy == spec.nbytes // options.current().layer_share  # the layer's share when memory allows
    tight = [_prepare.default_chunk_bytes(spec, free=f) for f in (800 << 20, 900 << 20)]
    # at most 1/8 of what is free, as a power of two so programs are reused as it shrinks
    assert tight == [64 << 20, 64 << 20]
    assert _prepare.default_chunk_bytes(spec, free=8 << 20) == 1 << 20
