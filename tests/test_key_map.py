"""prepare(keys=...): a model's own names for the canonical ones, validated."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import jax_nvfp4
from jax_nvfp4.layout import reference as _reference
from helpers import assert_bytes_equal, random_layer, to_jax

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
MODEL = ("gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale")
KEYS = dict(zip(NAMES, MODEL))


def test_model_names_are_found_and_kept(rng):
    hosts = [random_layer(rng, 2, 256, 64) for _ in range(2)]
    params = {"layers": [{"experts": dict(zip(MODEL, to_jax(h)), bias=jnp.ones(2))}
                         for h in hosts]}
    out = jax_nvfp4.prepare(params, keys=KEYS)
    for k, host in enumerate(hosts):
        moe = out["layers"][k]["experts"]
        assert isinstance(moe, jax_nvfp4.PreparedLayer)
        assert set(moe) == set(MODEL) | {"bias", "nvfp4_layout"}  # the model's names stay
        for name, want in zip(MODEL, _reference.prepare_layer(*host)):
            assert_bytes_equal(moe[name], want, name)
    with pytest.raises(ValueError, match="already in the TRT-LLM layout"):
        jax_nvfp4.prepare(out, keys=KEYS)
    assert jax_nvfp4.is_prepared(out["layers"][0]["experts"], keys=KEYS)


def test_partial_map_and_marker_name(rng):
    host = random_layer(rng, 2, 256, 64)
    names = ("w13_weight", "w13_weight_scale", "w2", "w2_scale")
    out = jax_nvfp4.prepare({"m": dict(zip(names, to_jax(host)))},
                            keys={"w2_weight": "w2", "w2_weight_scale": "w2_scale",
                                  "nvfp4_layout": "layout"})
    assert set(out["m"]) == set(names) | {"layout"}
    for name, want in zip(names, _reference.prepare_layer(*host)):
        assert_bytes_equal(out["m"][name], want, name)


def test_without_the_map_the_model_names_are_not_a_layer(rng):
    params = {"experts": dict(zip(MODEL, to_jax(random_layer(rng, 2, 256, 64))))}
    with pytest.raises(ValueError, match=r"no MoE layer found.*params\['experts'\].*keys="):
        jax_nvfp4.prepare(params)


@pytest.mark.parametrize("keys, error, match", [
    ({"w13_weights": "x"}, ValueError, r"'w13_weights' is not a canonical name \(did you mean "
                                       r"'w13_weight'\?\)"),
    ({"gate": "x"}, ValueError, "'gate' is not a canonical name"),
    ({"w13_weight": "down", "w2_weight": "down"}, ValueError,
     "'w13_weight' and 'w2_weight' both map to 'down'"),
    ({"w13_weight": "w2_weight"}, ValueError,  # collides with the canonical w2_weight
     "'w13_weight' and 'w2_weight' both map to 'w2_weight'"),
    ({"w13_weight": ""}, TypeError, "non-empty str"),
    ({"w13_weight": 3}, TypeError, "non-empty str"),
    ([("w13_weight", "x")], TypeError, "keys must be a mapping"),
])
def test_bad_maps_are_refused_before_anything(rng, keys, error, match):
    layer = to_jax(random_layer(rng, 2, 256, 64))
    with pytest.raises(error, match=match):
        jax_nvfp4.prepare({"m": dict(zip(NAMES, layer))}, keys=keys)
    assert not any(x.is_deleted() for x in layer)
