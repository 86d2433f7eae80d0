"""The Pallas row kernels (used for the weights on CUDA) give the same bytes; here in Pallas' interpreter."""

from __future__ import annotations

import pytest

from jax_nvfp4 import options, transform as _prepare
from jax_nvfp4.backends import select, xla
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax


@pytest.mark.parametrize("e, h, i, gated", [(3, 256, 128, True), (2, 128, 96, True),
                                            (3, 128, 128, False)])
@pytest.mark.parametrize("donate", [True, False])
def test_pallas_program_equals_reference_and_round_trips(rng, e, h, i, gated, donate):
    layer = random_layer(rng, e, h, i, gated=gated)
    spec = LayerSpec(e, h, i, gated, hidden_alignment=128)  # H padding: test_hidden_padding
    chunks = _prepare.experts_per_chunk(spec, 30000)  # several chunks, a tail
    arrays = to_jax(layer)
    pointers = [x.unsafe_buffer_pointer() for x in arrays]
    out = _prepare.compiled(spec, inverse=False, donate=donate, chunks=chunks, pallas=True)(*arrays)
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), out,
                          _reference.prepare_layer(*layer, gated=gated, hidden_alignment=128)):
        assert_bytes_equal(g, w, name)
    if donate and not spec.needs_padding:
        assert [x.unsafe_buffer_pointer() for x in out] == pointers
    back = _prepare.compiled(spec, inverse=True, donate=donate, chunks=chunks, pallas=True)(*out)
    if not spec.needs_padding:
        for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), back, layer):
            assert_bytes_equal(g, w, f"round trip {name}")


def test_pallas_is_used_only_on_gpu(rng):
    layer = to_jax(random_layer(rng, 2, 128, 64))
    on_gpu = all(d.platform == "gpu" for d in layer[0].devices())
    assert select.use_pallas(layer) == on_gpu
    with options.override(pallas=False):
        assert not select.use_pallas(layer)


def test_arrays_from_2gib_stay_on_xla():
    """Pallas' Triton lowering indexes with int32: larger arrays must not reach it."""
    spec = LayerSpec(256, 7168, 2048, True)  # w13 is 3.76 GB, the rest under 2 GiB
    fns = xla.transforms(spec, inverse=False, pallas=True)
    assert fns[0][1] is None  # XLA transpose, no kernel writer
    assert all(fns[k][1] is not None for k in (1, 2, 3))
