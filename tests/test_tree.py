"""prepare(params): every MoE layer of a pytree; other leaves untouched; never twice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4.layout import reference as _reference
from helpers import assert_bytes_equal, random_layer, to_jax

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


def _model(rng, layers=2, e=2, h=128, i=64):
    host, params = [], {"embed": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
                        "layers": []}
    for k in range(layers):
        arrays = random_layer(rng, e, h, i)
        host.append(arrays)
        moe = dict(zip(NAMES, to_jax(arrays)))
        moe["w13_weight_scale_2"] = jnp.asarray(rng.random(e), jnp.float32)
        params["layers"].append({"attn": {"wq": jnp.asarray(rng.random((4, 4)))},
                                 "mlp": {"experts": moe, "router": np.ones(3)},
                                 "norm": None, "name": f"layer{k}"})
    return params, host


def test_every_layer_prepared_and_other_leaves_kept(rng):
    params, host = _model(rng)
    others = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, dict) and "w2_weight" in x)
    out = jax_nvfp4.prepare(params)
    for k, arrays in enumerate(host):
        moe = out["layers"][k]["mlp"]["experts"]
        assert isinstance(moe, jax_nvfp4.PreparedLayer) and isinstance(moe, dict)
        assert jax_nvfp4.is_prepared(moe)
        for name, got, want in zip(NAMES, (moe[n] for n in NAMES), _reference.prepare_layer(*arrays)):
            assert_bytes_equal(got, want, name)
        # non-MoE entries of the layer and of the model are the very same objects
        assert moe["w13_weight_scale_2"] is params["layers"][k]["mlp"]["experts"]["w13_weight_scale_2"]
        assert out["layers"][k]["attn"]["wq"] is params["layers"][k]["attn"]["wq"]
        assert out["layers"][k]["mlp"]["router"] is params["layers"][k]["mlp"]["router"]
        assert out["layers"][k]["norm"] is None and out["layers"][k]["name"] == f"layer{k}"
        assert all(params["layers"][k]["mlp"]["experts"][n].is_deleted() for n in NAMES)
    assert out["embed"] is params["embed"]
    assert len(others) == len(jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, dict)
                                              and "w2_weight" in x))


def test_structure_is_kept_through_tree_map(rng):
    params, _ = _model(rng, layers=1)
    out = jax_nvfp4.prepare(params, donate=False)
    # one more leaf per layer: the marker that survives a save and restore (test_mark_survives)
    assert jax.tree.structure(params).num_leaves + 1 == jax.tree.structure(out).num_leaves
    mapped = jax.tree.map(lambda x: x, out)  # the mark survives tree transformations
    assert isinstance(mapped["layers"][0]["mlp"]["experts"], jax_nvfp4.PreparedLayer)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(out)[0]]
    assert "['layers'][0]['mlp']['experts']['w2_weight']" in paths


def test_prepare_twice_is_refused_and_deletes_nothing(rng):
    params, _ = _model(rng)
    out = jax_nvfp4.prepare(params)
    with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]\['mlp'\]\['experts'\] is "
                                         "already in the TRT-LLM layout"):
        jax_nvfp4.prepare(out)
    assert not any(x.is_deleted() for x in jax.tree.leaves(out) if isinstance(x, jax.Array))
    # also when the mark is only on the arrays (a plain dict holding prepared arrays)
    plain = {"moe": dict(out["layers"][0]["mlp"]["experts"])}
    with pytest.raises(ValueError, match="already in the TRT-LLM layout"):
        jax_nvfp4.prepare(plain)


def test_prepare_on_consumed_params_names_the_leaf(rng):
    params, _ = _model(rng)
    jax_nvfp4.prepare(params)
    with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]\['mlp'\]\['experts'\]"
                                         r"\.w13_weight has been deleted"):
        jax_nvfp4.prepare(params)


def test_bad_layer_refused_before_any_donation(rng):
    params, _ = _model(rng, layers=3)
    bad = params["layers"][2]["mlp"]["experts"]
    bad["w2_weight"] = bad["w2_weight"][:, :64]  # wrong hidden size in the last layer
    with pytest.raises(ValueError, match=r"\['layers'\]\[2\].*w2_weight"):
        jax_nvfp4.prepare(params)
    for layer in params["layers"]:
        assert not any(layer["mlp"]["experts"][n].is_deleted() for n in NAMES)


def test_shared_array_cannot_be_donated_twice(rng):
    params, _ = _model(rng, layers=2)
    params["layers"][1]["mlp"]["experts"]["w2_weight"] = params["layers"][0]["mlp"]["experts"]["w2_weight"]
    with pytest.raises(ValueError, match="donated twice"):
        jax_nvfp4.prepare(params)
    assert not params["layers"][0]["mlp"]["experts"]["w2_weight"].is_deleted()


def test_tree_without_moe_layer(rng):
    with pytest.raises(ValueError, match="no MoE layer found"):
        jax_nvfp4.prepare({"w": jnp.ones(3)})


def test_non_gated_and_lists(rng):
    arrays = random_layer(rng, 2, 128, 128, gated=False)
    params = [dict(zip(NAMES, to_jax(arrays)))]
    out = jax_nvfp4.prepare(params, gated=False)
    assert isinstance(out, list)
    for name, want in zip(NAMES, _reference.prepare_layer(*arrays, gated=False)):
        assert_bytes_equal(out[0][name], want, name)


def test_prepared_layer_records_valid_sizes(rng):
    params, _ = _model(rng, layers=2, e=2, h=128, i=96)  # I = 96 is padded to 128
    out = jax_nvfp4.prepare(params)
    moe = out["layers"][1]["mlp"]["experts"]
    assert (moe.hidden_size, moe.intermediate_size) == (128, 96)
    assert moe["w2_weight"].shape[2] == 128 // 2  # the arrays are padded, the sizes are not
    assert "hidden_size=128" in repr(moe) and "intermediate_size=96" in repr(moe)


def test_prepared_layer_sizes_are_pytree_aux_data(rng):
    import copy
    import pickle
    layer = jax_nvfp4.PreparedLayer({"a": jnp.ones(2), "b": 3.0}, hidden_size=2688,
                                    intermediate_size=1856)
    for got in (jax.tree.map(lambda x: x * 2, layer),
                jax.tree.unflatten(*reversed(jax.tree.flatten(layer))),
                jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(layer),
                                             jax.tree_util.tree_leaves(layer)),
                jax.device_put(layer), layer.copy(), copy.deepcopy(layer),
                pickle.loads(pickle.dumps(layer)), jax_nvfp4.PreparedLayer(layer)):
        assert isinstance(got, jax_nvfp4.PreparedLayer)
        assert (got.hidden_size, got.intermediate_size) == (2688, 1856)
        assert sorted(got) == ["a", "b"]
    # the sizes are part of the tree structure: layers with other sizes are other trees
    other = jax_nvfp4.PreparedLayer(layer, hidden_size=2560)
    assert other.intermediate_size == 1856
    assert jax.tree.structure(other) != jax.tree.structure(layer)
    plain = jax_nvfp4.PreparedLayer({"a": 1})
    assert (plain.hidden_size, plain.intermediate_size) == (None, None)
    assert "hidden_size=None" in repr(plain)
    with pytest.raises(TypeError, match="hidden_size must be a positive int"):
        jax_nvfp4.PreparedLayer({}, hidden_size=0)
    with pytest.raises(TypeError, match="intermediate_size must be a positive int"):
        jax_nvfp4.PreparedLayer({}, intermediate_size=1.5)


def test_the_tree_may_be_one_layer(rng):
    arrays = random_layer(rng, 2, 256, 64)
    out = jax_nvfp4.prepare(dict(zip(NAMES, to_jax(arrays))))
    assert isinstance(out, jax_nvfp4.PreparedLayer)
    for name, want in zip(NAMES, _reference.prepare_layer(*arrays)):
        assert_bytes_equal(out[name], want, name)
    with pytest.raises(ValueError, match=r"^params is already in the TRT-LLM layout"):
        jax_nvfp4.prepare(out)
