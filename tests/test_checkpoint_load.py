"""load(path): ModelOpt NVFP4 checkpoints to params, bit-exact, both namings, filters, sharding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4 import _reference
from jax_nvfp4._spec import NAMES
from jax_nvfp4.testing import write_checkpoint
from ckpt_helpers import MOE, scalars, stacked
from helpers import assert_bytes_equal, to_jax

SCALES = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")


def _experts(params, naming, layer):
    return params["model"]["layers"][str(layer)][MOE[naming]]["experts"]


def _seed(rng):
    return int(rng.integers(2**31))


@pytest.mark.parametrize("naming", ["qwen3", "mixtral"])
def test_load_is_prepare_layer_on_the_stacked_experts(tmp_path, rng, naming):
    e = 3
    tensors = write_checkpoint(tmp_path, naming=naming, layers=2, experts=e, hidden=256,
                               intermediate=64, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path)
    for layer in range(2):
        moe = _experts(params, naming, layer)
        assert isinstance(moe, jax_nvfp4.PreparedLayer) and jax_nvfp4.is_prepared(moe)
        host = stacked(tensors, naming, layer, e)
        want = jax_nvfp4.prepare_layer(*to_jax(host))
        ref = _reference.prepare_layer(*host)
        for name, w, r in zip(NAMES, want, ref):
            assert moe[name].dtype == w.dtype and isinstance(moe[name], jax.Array)
            assert_bytes_equal(moe[name], w, name)
            assert_bytes_equal(moe[name], r, name)
        for name, w in scalars(tensors, naming, layer, e).items():
            assert moe[name].dtype == np.float32 and moe[name].shape == w.shape
            np.testing.assert_array_equal(np.asarray(moe[name]), w, err_msg=name)
        assert set(moe) == set(NAMES) | set(SCALES)  # no per-expert tensor left
    with pytest.raises(ValueError, match="already in the TRT-LLM layout"):
        jax_nvfp4.prepare(params)


def test_other_tensors_pass_through_unchanged(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, layers=2, experts=2, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path)
    flat = {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    others = {n: x for n, x in tensors.items() if ".experts." not in n}
    assert "model.layers.1.mlp.shared_expert.down_proj.weight_scale" in others  # float8
    assert "model.layers.0.mlp.gate.weight" in others and "lm_head.weight" in others
    for name, want in others.items():
        got = flat[name]
        assert isinstance(got, jax.Array) and got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert np.asarray(got).tobytes() == want.tobytes(), name
    assert len(flat) == len(others) + 2 * 8


def test_unprepared_load_then_prepare(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, naming="mixtral", layers=1, experts=2, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path, prepare=False)
    moe = _experts(params, "mixtral", 0)
    assert type(moe) is dict and not jax_nvfp4.is_prepared(moe)
    host = stacked(tensors, "mixtral", 0, 2)
    for name, x in zip(NAMES, host):
        assert_bytes_equal(moe[name], x, name)  # checkpoint layout, rows [up (w3); gate (w1)]
    assert moe["w13_weight_scale"].dtype == jax.numpy.float8_e4m3fn
    out = jax_nvfp4.prepare(params)
    for name, r in zip(NAMES, _reference.prepare_layer(*host)):
        assert_bytes_equal(_experts(out, "mixtral", 0)[name], r, name)


def test_padded_intermediate(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, layers=1, experts=2, intermediate=96, seed=_seed(rng))
    moe = _experts(jax_nvfp4.load(tmp_path), "qwen3", 0)
    assert moe["w13_weight"].shape == (2, 256, 128)
    for name, r in zip(NAMES, _reference.prepare_layer(*stacked(tensors, "qwen3", 0, 2))):
        assert_bytes_equal(moe[name], r, name)


def test_layers_filter(tmp_path, rng):
    write_checkpoint(tmp_path, layers=3, experts=2, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path, layers=[2], prepare=False)
    assert set(params["model"]["layers"]) == {"2"}
    assert "embed_tokens" in params["model"] and "lm_head" in params
    with pytest.raises(ValueError, match=r"no decoder layer \[5\].*0-2"):
        jax_nvfp4.load(tmp_path, layers=[0, 5])


@pytest.mark.parametrize("prepare", [False, True])
def test_sharded_over_experts_each_device_gets_its_own(tmp_path, rng, prepare):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    tensors = write_checkpoint(tmp_path, layers=1, experts=8, seed=_seed(rng))
    s = NamedSharding(Mesh(np.array(jax.devices("cpu")[:4]), ("expert",)), P("expert"))
    params = jax_nvfp4.load(tmp_path, prepare=prepare, sharding=s)
    moe = _experts(params, "qwen3", 0)
    want = stacked(tensors, "qwen3", 0, 8)
    if prepare:
        want = _reference.prepare_layer(*want)
    for name, w in list(zip(NAMES, want)) + list(scalars(tensors, "qwen3", 0, 8).items()):
        x = moe[name]
        assert x.sharding == s, (name, x.sharding)
        assert len(x.addressable_shards) == 4
        for sh in x.addressable_shards:
            assert sh.data.shape == (2, *w.shape[1:]), (name, sh.data.shape)
            assert sh.data.devices() == {sh.device}
            got = np.asarray(sh.data)
            assert np.array_equal(got.view(np.uint8) if got.itemsize == 1 else got,
                                  w[sh.index]), name
    emb = params["lm_head"]["weight"]
    assert len(emb.devices()) == 4 and emb.sharding.is_fully_replicated


def test_bad_arguments(tmp_path, rng):
    write_checkpoint(tmp_path, layers=1, experts=2, seed=_seed(rng))
    with pytest.raises(TypeError, match="sharding must be a jax.sharding.Sharding"):
        jax_nvfp4.load(tmp_path, sharding="expert")
    with pytest.raises(TypeError, match="prepare must be a bool"):
        jax_nvfp4.load(tmp_path, prepare=None)
