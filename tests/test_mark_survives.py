"""The prepared state survives a save and restore: the marker leaf "nvfp4_layout".

In-process marks (the PreparedLayer type, marked arrays, fingerprints of their bytes) die
with the process; a restored layer is new arrays. A new process is emulated here by
switching the fingerprint check off (options check_copies), so only the marker can tell."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4 import options
from jax_nvfp4.tree import marks as _marks
from jax_nvfp4.layout import reference as _reference
from helpers import assert_bytes_equal, random_layer, to_jax

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


@pytest.fixture
def new_process():
    with options.override(check_copies=False):
        yield


def _params(rng, i=96):
    host = random_layer(rng, 2, 256, i)  # I = 96 is padded to 128: the sizes must come back
    return {"layers": [{"moe": dict(zip(NAMES, to_jax(host)), router=jnp.ones(3))}]}, host


def _roundtrip_host(tree):
    """device_get + device_put and a flatten/unflatten through plain containers."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    host = {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}
    return {"layers": [{"moe": {k.split("['")[-1][:-2]: jax.device_put(v)
                                for k, v in host.items() if "['moe']" in k}}]}


def _roundtrip_orbax(tree, path):
    ocp = pytest.importorskip("orbax.checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "ckpt", tree)
    checkpointer.wait_until_finished()
    return checkpointer.restore(path / "ckpt")


@pytest.mark.parametrize("how", ["device_get", "orbax"])
def test_restored_layer_is_refused_then_recovered(rng, tmp_path, new_process, how):
    params, host = _params(rng)
    out = jax_nvfp4.prepare(params)
    marker = np.asarray(out["layers"][0]["moe"]["nvfp4_layout"])
    assert marker.dtype == np.int32 and marker[0] == _marks.MAGIC
    assert tuple(marker[1:]) == (_marks.LAYOUT_VERSION, 1, 2, 256, 96, 256, 128)
    restored = (_roundtrip_host(out) if how == "device_get"
                else _roundtrip_orbax(out, tmp_path))
    moe = restored["layers"][0]["moe"]
    assert type(moe) is dict and not any(_marks.is_marked(moe[n]) for n in NAMES)
    assert jax_nvfp4.is_prepared(moe)
    with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]\['moe'\] is already in the "
                                         r"TRT-LLM layout \(its 'nvfp4_layout' marker says so: "
                                         r"prepared by jax_nvfp4, H=256, I=96\)"):
        jax_nvfp4.prepare(restored)
    assert not any(moe[n].is_deleted() for n in NAMES)
    back = jax_nvfp4.prepare(restored, skip_prepared=True)["layers"][0]["moe"]
    assert isinstance(back, jax_nvfp4.PreparedLayer)
    assert (back.hidden_size, back.intermediate_size) == (256, 96)
    for name, want in zip(NAMES, _reference.prepare_layer(*host)):
        assert_bytes_equal(back[name], want, name)  # untouched: not shuffled twice
    assert jax_nvfp4.is_prepared(back) and all(_marks.is_marked(back[n]) for n in NAMES)


def test_without_the_marker_a_restored_layer_cannot_be_told(rng, new_process):
    """What cannot be detected: restored bytes without their marker look like any layer."""
    params, host = _params(rng, i=128)
    out = jax_nvfp4.prepare(params)
    restored = _roundtrip_host(out)
    del restored["layers"][0]["moe"]["nvfp4_layout"]
    twice = jax_nvfp4.prepare(restored)["layers"][0]["moe"]  # shuffled a second time
    want = _reference.prepare_layer(*host)
    assert not np.array_equal(np.asarray(twice["w13_weight"]), want[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Experts:
    w13_weight: jax.Array
    w13_weight_scale: jax.Array
    w2_weight: jax.Array
    w2_weight_scale: jax.Array
    nvfp4_layout: jax.Array | None = None  # declared: prepare fills it


def test_a_declared_field_carries_the_marker(rng, tmp_path, new_process):
    host = random_layer(rng, 2, 256, 64)
    out = jax_nvfp4.prepare({"moe": Experts(*to_jax(host))})
    assert type(out["moe"]) is Experts and out["moe"].nvfp4_layout is not None
    restored = _roundtrip_orbax(out, tmp_path)  # restored as plain dicts: the marker is there
    with pytest.raises(ValueError, match="marker says so"):
        jax_nvfp4.prepare(restored)
    # restored into the dataclass (device_get/put of its leaves): refused as well
    again = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), out)
    assert type(again["moe"]) is Experts
    with pytest.raises(ValueError, match="marker says so"):
        jax_nvfp4.prepare(again)
    assert jax_nvfp4.prepare(again, skip_prepared=True)["moe"] is not None


def test_placeholder_marker_and_foreign_marker(rng, new_process):
    host = random_layer(rng, 2, 256, 64)
    layer = dict(zip(NAMES, to_jax(host)), nvfp4_layout=jnp.zeros(8, jnp.int32))
    out = jax_nvfp4.prepare({"moe": layer})  # zeros: a placeholder, not a mark
    assert np.asarray(out["moe"]["nvfp4_layout"])[0] == _marks.MAGIC
    other = to_jax(random_layer(rng, 4, 256, 64))  # another layer's sizes (E = 4)
    wrong = dict(zip(NAMES, other), nvfp4_layout=out["moe"]["nvfp4_layout"])
    with pytest.raises(ValueError, match=r"the layout marker says E, Hp, Ip = \(2, 256, 64\), but "
                                         r"the arrays have \(4, 256, 64\)"):
        jax_nvfp4.prepare({"moe": wrong})
    future = np.asarray(out["moe"]["nvfp4_layout"]).copy()
    future[1] = 99
    with pytest.raises(ValueError, match="marker of version 99"):
        jax_nvfp4.prepare({"moe": dict(zip(NAMES, to_jax(host)), nvfp4_layout=future)})
    assert not any(x.is_deleted() for x in other)


def test_the_fingerprint_still_refuses_copies_in_process(rng):
    """engineer A's in-process check is unchanged: a copy without its marker is refused."""
    params, _ = _params(rng, i=128)
    out = jax_nvfp4.prepare(params)
    restored = _roundtrip_host(out)
    del restored["layers"][0]["moe"]["nvfp4_layout"]
    with pytest.raises(ValueError, match="holds the bytes of an array that came out of prepare"):
        jax_nvfp4.prepare(restored)


def test_sharded_marker_is_replicated(rng):
    devices = jax.devices("cpu")[:4]
    mesh = jax.make_mesh((4,), ("x",), devices=devices)
    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    layer = [jax.device_put(x, s) for x in to_jax(random_layer(rng, 4, 256, 64))]
    out = jax_nvfp4.prepare({"moe": dict(zip(NAMES, layer))})
    marker = out["moe"]["nvfp4_layout"]
    assert marker.sharding.mesh == mesh and marker.sharding.is_fully_replicated


def test_loaded_layers_carry_the_marker(tmp_path, new_process):
    from jax_nvfp4.testing import write_checkpoint
    write_checkpoint(tmp_path / "src", layers=1, experts=4, hidden=384, intermediate=64, seed=3)
    params = jax_nvfp4.load(tmp_path / "src")
    moe = params["model"]["layers"]["0"]["mlp"]["experts"]
    assert tuple(np.asarray(moe["nvfp4_layout"])[1:]) == (_marks.LAYOUT_VERSION, 1, 4, 384, 64,
                                                          512, 64)
    restored = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), dict(moe))
    with pytest.raises(ValueError, match="marker says so"):
        jax_nvfp4.prepare({"moe": restored})
    raw = jax_nvfp4.load(tmp_path / "src", prepare=False)["model"]["layers"]["0"]["mlp"]
    assert "nvfp4_layout" not in raw["experts"]  # checkpoint layout: nothing to mark
