"""prepare() finds MoE layers in the containers real JAX models use, and gives them back as
the same container type holding the prepared arrays (flax nnx, registered dataclasses,
NamedTuples, nodes registered with keys); broken or absent layers are named."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4.layout import reference as _reference
from helpers import assert_bytes_equal, random_layer, to_jax

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


def _check(got, host, what, **kw):
    for name, x, want in zip(NAMES, got, _reference.prepare_layer(*host, **kw)):
        assert isinstance(x, jax.Array), f"{what} {name}: {type(x).__name__}"
        assert_bytes_equal(x, want, f"{what} {name}")


# --- flax nnx ---------------------------------------------------------------------------

def _nnx_model(rng, h=256, i=64, marker=False):
    nnx = pytest.importorskip("flax.nnx")
    host = random_layer(rng, 2, h, i)
    arrays = to_jax(host)

    class Experts(nnx.Module):
        def __init__(self):
            for name, x in zip(NAMES, arrays):
                setattr(self, name, nnx.Param(x))
            if marker:  # declared by the model so that the mark is saved with it
                self.nvfp4_layout = nnx.Variable(jnp.zeros(8, jnp.int32))

    class Block(nnx.Module):
        def __init__(self):
            self.experts = Experts()
            self.norm = nnx.Param(jnp.asarray(rng.standard_normal(4), jnp.float32))

    return nnx, Block(), host


@pytest.mark.parametrize("h", [256, 128], ids=["in-place", "H-padded"])
def test_nnx_state(rng, h):
    """Before: a JAX-internal __jax_array__ error once validation had passed (the nnx.Param
    wrappers reached lax.dynamic_slice inside the in-place program)."""
    nnx, model, host = _nnx_model(rng, h=h)
    state = nnx.state(model)
    out = jax_nvfp4.prepare(state)
    assert type(out) is type(state)
    experts = out["experts"]
    for name in NAMES:
        assert isinstance(experts[name], nnx.Param)  # the wrapper kind comes back
    _check([experts[n].get_value() for n in NAMES], host, "nnx.state")
    assert out["norm"].get_value() is state["norm"].get_value()
    assert all(state["experts"][n].get_value().is_deleted() for n in NAMES)
    assert jax_nvfp4.is_prepared(experts)
    with pytest.raises(ValueError, match=r"params\['experts'\] is already in the TRT-LLM layout"):
        jax_nvfp4.prepare(out)


@pytest.mark.parametrize("donate", [True, False])
def test_nnx_split_prepare_merge(rng, donate):
    nnx, model, host = _nnx_model(rng)
    graphdef, state = nnx.split(model)
    prepared = jax_nvfp4.prepare(state, donate=donate)
    merged = nnx.merge(graphdef, prepared)  # the same structure: merge takes it
    _check([getattr(merged.experts, n).get_value() for n in NAMES], host, "merged")
    assert isinstance(merged.experts.w13_weight, nnx.Param)
    np.testing.assert_array_equal(np.asarray(merged.norm.get_value()),
                                  np.asarray(state["norm"].get_value()))
    # nnx.update puts them into the live model too
    nnx.update(model, prepared)
    _check([getattr(model.experts, n).get_value() for n in NAMES], host, "updated")


def test_nnx_declared_marker_is_filled(rng):
    nnx, model, host = _nnx_model(rng, marker=True)
    graphdef, state = nnx.split(model)
    prepared = jax_nvfp4.prepare(state)
    merged = nnx.merge(graphdef, prepared)
    marker = np.asarray(merged.experts.nvfp4_layout.get_value())
    assert marker[0] == jax_nvfp4.tree.marks.MAGIC and tuple(marker[3:6]) == (2, 256, 64)


def test_nnx_module_itself(rng):
    """flax nnx Modules are pytrees: prepare(model) returns a model."""
    nnx, model, host = _nnx_model(rng)
    out = jax_nvfp4.prepare(model)
    assert type(out) is type(model)
    _check([getattr(out.experts, n).get_value() for n in NAMES], host, "module")


# --- registered dataclasses, NamedTuples, nodes with keys --------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FusedMoEWeights:  # as tpu-inference's (tpu_inference/layers/common/process_weights)
    w13_weight: jax.Array
    w13_weight_scale: jax.Array | None
    w13_bias: jax.Array | None
    w2_weight: jax.Array
    w2_weight_scale: jax.Array | None
    w2_bias: jax.Array | None


class MoETuple(NamedTuple):
    w13_weight: jax.Array
    w13_weight_scale: jax.Array
    w2_weight: jax.Array
    w2_weight_scale: jax.Array
    router: jax.Array


class KeyedExperts:
    """A node registered with register_pytree_with_keys (DictKey children) and aux data."""

    def __init__(self, arrays, tag):
        self.arrays, self.tag = dict(arrays), tag


jax.tree_util.register_pytree_with_keys(
    KeyedExperts,
    lambda x: ([(jax.tree_util.DictKey(k), v) for k, v in sorted(x.arrays.items())],
               (tuple(sorted(x.arrays)), x.tag)),
    lambda aux, children: KeyedExperts(zip(aux[0], children), aux[1]))


class Unregistered(Mapping):
    """A Mapping jax does not know: a leaf of the tree, found as today."""

    def __init__(self, d):
        self._d = dict(d)

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def _containers(arrays, bias):
    w13, s13, w2, s2 = arrays
    return {
        "dataclass": FusedMoEWeights(w13, s13, None, w2, s2, bias),
        "namedtuple": MoETuple(w13, s13, w2, s2, bias),
        "keyed": KeyedExperts(zip(NAMES + ("bias",), (w13, s13, w2, s2, bias)), tag="t"),
    }


@pytest.mark.parametrize("kind", ["dataclass", "namedtuple", "keyed"])
def test_registered_containers_come_back_as_themselves(rng, kind):
    host = random_layer(rng, 2, 256, 64)
    bias = jnp.ones(3)
    layer = _containers(to_jax(host), bias)[kind]
    params = {"model": {"layers": [{"moe": layer}]}}
    out = jax_nvfp4.prepare(params)
    got = out["model"]["layers"][0]["moe"]
    assert type(got) is type(layer)
    read = (lambda x, n: x.arrays[n]) if kind == "keyed" else getattr
    _check([read(got, n) for n in NAMES], host, kind)
    if kind == "dataclass":
        assert got.w13_bias is None and got.w2_bias is bias
    elif kind == "namedtuple":
        assert got.router is bias
    else:
        assert got.tag == "t" and got.arrays["bias"] is bias
    assert jax_nvfp4.is_prepared(got)
    with pytest.raises(ValueError, match=r"\['moe'\] is already in the TRT-LLM layout"):
        jax_nvfp4.prepare(out)


def test_unregistered_mapping_and_frozendict(rng):
    host = random_layer(rng, 2, 256, 64)
    out = jax_nvfp4.prepare({"moe": Unregistered(zip(NAMES, to_jax(host)))})
    assert isinstance(out["moe"], jax_nvfp4.PreparedLayer)
    _check([out["moe"][n] for n in NAMES], host, "Mapping")
    flax_core = pytest.importorskip("flax.core")
    host = random_layer(rng, 2, 256, 64)
    frozen = flax_core.FrozenDict(zip(NAMES, to_jax(host)))
    out = jax_nvfp4.prepare({"moe": frozen})
    assert type(out["moe"]) is flax_core.FrozenDict
    _check([out["moe"][n] for n in NAMES], host, "FrozenDict")


def test_bad_array_in_a_dataclass_named_and_nothing_donated(rng):
    host = random_layer(rng, 2, 256, 64)
    w13, s13, w2, s2 = to_jax(host)
    good = FusedMoEWeights(w13, s13, None, w2, s2, None)
    bad = FusedMoEWeights(*to_jax(random_layer(rng, 2, 256, 64))[:2], None,
                          jnp.zeros((2, 128, 32), jnp.uint8), s2, None)
    with pytest.raises(ValueError, match=r"params\[1\]\.w2_weight: expected hidden size 256"):
        jax_nvfp4.prepare([good, bad])
    assert not any(x.is_deleted() for x in (w13, s13, w2, s2))


# --- no layer, near misses -----------------------------------------------------------------

def test_no_layer_names_the_candidates(rng):
    w13, s13, w2, s2 = to_jax(random_layer(rng, 2, 256, 64))
    params = {"mlp": {"experts": {"gate_up_proj": w13, "gate_up_scale": s13,
                                  "down_proj": w2, "down_scale": s2}}}
    with pytest.raises(ValueError, match=r"no MoE layer found.*params\['mlp'\]\['experts'\] "
                                         r"\(holds \['down_proj', 'down_scale', 'gate_up_proj',"
                                         r" 'gate_up_scale'\]\).*pass keys="):
        jax_nvfp4.prepare(params)
    with pytest.raises(ValueError, match=r"no MoE layer found.*pass keys="):
        jax_nvfp4.prepare({"w": jnp.ones(3)})


def test_three_of_four_keys(rng):
    w13, s13, w2, s2 = to_jax(random_layer(rng, 2, 256, 64))
    good = dict(zip(NAMES, to_jax(random_layer(rng, 2, 256, 64))))
    params = {"layers": [good, {"w13_weight": w13, "w13_weight_scale": s13, "w2_weight": w2}]}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\] has \['w13_weight', "
                                         r"'w13_weight_scale', 'w2_weight'\].*'w2_weight_scale' "
                                         r"missing"):
        jax_nvfp4.prepare(params)
    assert not any(x.is_deleted() for x in good.values())  # the good layer is not donated


def test_misspelt_key_suggests_the_close_name(rng):
    w13, s13, w2, s2 = to_jax(random_layer(rng, 2, 256, 64))
    params = {"moe": {"w13_weight": w13, "w13_weight_scale": s13, "w2_weight": w2,
                      "w2_weigth_scale": s2}}
    with pytest.raises(ValueError, match=r"params\['moe'\].*'w2_weight_scale' missing \(it has "
                                         r"'w2_weigth_scale': misspelt\? map it with "
                                         r"keys=\{'w2_weight_scale': 'w2_weigth_scale'\}\)"):
        jax_nvfp4.prepare(params)
    # ... and the suggestion works
    out = jax_nvfp4.prepare(params, keys={"w2_weight_scale": "w2_weigth_scale"})
    assert isinstance(out["moe"], jax_nvfp4.PreparedLayer) and "w2_weigth_scale" in out["moe"]


def test_unquantized_neighbours_are_not_near_misses(rng):
    """A bf16 shared expert with w13_weight and w2_weight but no scales is not a layer."""
    host = random_layer(rng, 2, 256, 64)
    params = {"moe": dict(zip(NAMES, to_jax(host))),
              "shared": {"w13_weight": jnp.ones((4, 4)), "w2_weight": jnp.ones((4, 4))}}
    out = jax_nvfp4.prepare(params)
    assert out["shared"] is params["shared"] or out["shared"]["w2_weight"] is \
        params["shared"]["w2_weight"]
    _check([out["moe"][n] for n in NAMES], host, "moe")


def test_nnx_separate_gate_up_is_refused_with_the_way_out(rng):
    nnx = pytest.importorskip("flax.nnx")
    host = random_layer(rng, 2, 256, 64)
    i = host[0].shape[1] // 2
    arrays = to_jax([host[0][:, i:], host[1][:, i:], host[0][:, :i], host[1][:, :i],
                     host[2], host[3]])

    class Experts(nnx.Module):
        def __init__(self):
            for name, x in zip(("w1_weight", "w1_weight_scale", "w3_weight", "w3_weight_scale",
                                "w2_weight", "w2_weight_scale"), arrays):
                setattr(self, name, nnx.Param(x))

    class Block(nnx.Module):
        def __init__(self):
            self.experts = Experts()

    with pytest.raises(ValueError, match=r"params: separate gate and up .* in a State cannot"):
        jax_nvfp4.prepare(nnx.state(Experts()))  # the state is the layer
    with pytest.raises(ValueError, match=r"params\['experts'\]: separate gate and up .* a dict "
                                         r"of wrapped arrays \(e\.g\. an nnx State.*fuse_gate_up"):
        jax_nvfp4.prepare(nnx.state(Block()))  # nested: a dict of nnx.Params inside the State
    assert not any(x.is_deleted() for x in arrays)


def test_linen_partitioned_boxes(rng):
    """flax.linen's nn.Partitioned (a one-array box with sharding names) is unwrapped and the
    prepared array put back into a box with the same names."""
    nn = pytest.importorskip("flax.linen")
    host = random_layer(rng, 2, 256, 64)
    names = ("expert", None, None)
    params = {"params": {"moe": {n: nn.Partitioned(x, names=names)
                                 for n, x in zip(NAMES, to_jax(host))}}}
    out = jax_nvfp4.prepare(params)
    moe = out["params"]["moe"]
    assert all(isinstance(moe[n], nn.Partitioned) and moe[n].names == names for n in NAMES)
    _check([moe[n].value for n in NAMES], host, "Partitioned")
