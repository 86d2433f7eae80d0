"""The order of w13's halves (w13_order) and separate gate/up arrays fused by the library.

The kernel wants each expert's w13 as [up (w3); gate (w1)]; HF/vLLM/tpu-inference fuse
[gate; up]. Every result is compared with the reference applied to the [up; gate] version
(and with flashinfer's own row-index helpers, which take w3_w1 = [up; gate])."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_nvfp4
from jax_nvfp4.layout import reference as _reference
from helpers import assert_bytes_equal, random_layer, to_jax

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


def _gate_up(x):
    """[up; gate] rows of each expert -> [gate; up] (the checkpoint order of HF/vLLM)."""
    i = x.shape[1] // 2
    return np.concatenate([x[:, i:], x[:, :i]], axis=1)


def _halves(x):
    i = x.shape[1] // 2
    return x[:, i:], x[:, :i]  # gate, up of an [up; gate] array


def _own(x):
    """A jitted copy: one XLA-owned buffer (on CPU device_put may alias numpy memory)."""
    return jax.jit(jnp.copy)(x)


@pytest.mark.parametrize("e, h, i, donate", [(2, 256, 64, True), (3, 256, 128, False),
                                             (2, 128, 96, True)],  # I padded to 128
                         ids=["in-place", "kept", "I-padded"])
def test_prepare_layer_gate_up_order(rng, e, h, i, donate):
    host = random_layer(rng, e, h, i)  # [up; gate], as the reference wants
    want = _reference.prepare_layer(*host)
    given = [_gate_up(host[0]), _gate_up(host[1]), host[2], host[3]]
    layer = [_own(x) for x in to_jax(given)]
    pointer = layer[0].unsafe_buffer_pointer()
    out = jax_nvfp4.prepare_layer(*layer, w13_order="gate_up", donate=donate, chunk_bytes=4096)
    for name, got, w in zip(NAMES, out, want):
        assert_bytes_equal(got, w, name)
    assert all(x.is_deleted() == donate for x in layer)
    if donate and i % 64 == 0 and h % 256 == 0:  # in place: the swap and the layout
        assert out[0].unsafe_buffer_pointer() == pointer
    # the default order on the same bytes is a different (wrong for this input) layout
    wrong = jax_nvfp4.prepare_layer(*to_jax(given))
    assert not np.array_equal(np.asarray(wrong[0]), want[0])
    # and back: unprepare gives the [gate; up] checkpoint bytes again
    back = jax_nvfp4.unprepare_layer(*out, w13_order="gate_up", hidden_size=h,
                                     intermediate_size=i)
    for name, got, w in zip(NAMES, back, given):
        assert_bytes_equal(got, w, f"unprepared {name}")


def test_gate_up_order_equals_flashinfers_helpers(rng):
    torch = pytest.importorskip("torch")
    fi_core = pytest.importorskip("flashinfer.fused_moe.core")
    host = random_layer(rng, 2, 256, 128)
    w3_w1 = torch.from_numpy(host[0][0])  # flashinfer's helper takes [up (w3); gate (w1)]
    index = fi_core._maybe_get_cached_w3_w1_permute_indices({}, w3_w1, 128,
                                                             is_gated_act_gemm=True)
    out = jax_nvfp4.prepare_layer(*to_jax([_gate_up(host[0]), _gate_up(host[1]), *host[2:]]),
                                  w13_order="gate_up", hidden_alignment=256)
    assert_bytes_equal(np.asarray(out[0])[0], host[0][0][index.numpy()], "w13 expert 0")


def test_order_is_validated_before_anything_is_donated(rng):
    layer = to_jax(random_layer(rng, 2, 256, 64))
    with pytest.raises(ValueError, match=r"w13_order must be one of \('up_gate', 'gate_up'\)"):
        jax_nvfp4.prepare_layer(*layer, w13_order="gate-up")
    with pytest.raises(ValueError, match="w13_order must be one of"):
        jax_nvfp4.prepare({"m": dict(zip(NAMES, layer))}, w13_order=None)
    nongated = to_jax(random_layer(rng, 2, 256, 128, gated=False))
    with pytest.raises(ValueError, match="w13_order='gate_up' is for gated layers"):
        jax_nvfp4.prepare_layer(*nongated, gated=False, w13_order="gate_up")
    bad = list(layer)
    bad[2] = bad[2][:, :128]  # a wrong w2: refused before the halves are swapped
    with pytest.raises(ValueError, match="w2_weight"):
        jax_nvfp4.prepare_layer(*bad, w13_order="gate_up")
    assert not any(x.is_deleted() for x in layer + nongated)


def test_tree_gate_up_order(rng):
    hosts = [random_layer(rng, 2, 256, 64) for _ in range(2)]
    params = {"layers": [{"moe": dict(zip(NAMES, to_jax([_gate_up(h[0]), _gate_up(h[1]),
                                                          *h[2:]])))} for h in hosts]}
    out = jax_nvfp4.prepare(params, w13_order="gate_up")
    for k, host in enumerate(hosts):
        for name, want in zip(NAMES, _reference.prepare_layer(*host)):
            assert_bytes_equal(out["layers"][k]["moe"][name], want, f"layer {k} {name}")


def _tp_setup(rng):
    """A layer of 2 experts, I = 2 x 64, and a 2 x 2 ("e", "t") mesh of 4 CPU devices
    (skipped without them): (host, mesh, t, i_local)."""
    devices = jax.devices("cpu")[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 CPU devices (conftest.py)")
    t, i_local = 2, 64
    host = random_layer(rng, 2, 256, t * i_local)
    return host, jax.make_mesh((2, t), ("e", "t"), devices=devices), t, i_local


def _rank_layer(host, mesh, shard, t, i_local):
    """The reference of what ``shard``'s device holds: its TP rank's own layer, prepared
    (``host`` in the checkpoint layout, w13 rows [up; gate], ``t`` ranks of ``i_local``)."""
    w13, s13, w2, s2 = host
    e, j = shard.index[0], int(np.argwhere(mesh.devices == shard.device)[0][1])
    up = slice(j * i_local, (j + 1) * i_local)
    gate = slice(t * i_local + j * i_local, t * i_local + (j + 1) * i_local)
    local = [np.concatenate([w13[e, up], w13[e, gate]], axis=1),
             np.concatenate([s13[e, up], s13[e, gate]], axis=1),
             w2[e, :, j * i_local // 2:(j + 1) * i_local // 2],
             s2[e, :, j * i_local // 16:(j + 1) * i_local // 16]]
    return _reference.prepare_layer(*local)


def test_sharded_tp_layer_in_gate_up_order(rng):
    """I split over devices: each device's rows are its own [gate_j; up_j]; swapped per device."""
    host, mesh, t, i_local = _tp_setup(rng)
    # what a TP checkpoint loader builds from HF's [gate; up]: [gate_0; up_0; gate_1; up_1]
    gate_up = [_gate_up(host[0]), _gate_up(host[1])]
    tp13 = jax_nvfp4.tp_interleave(*gate_up, tp=t)
    specs = (P("e", "t"), P("e", "t"), P("e", None, "t"), P("e", None, "t"))
    arrays = to_jax([tp13[0], tp13[1], host[2], host[3]])
    layer = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(arrays, specs)]
    out = jax_nvfp4.prepare_layer(*layer, w13_order="gate_up", chunk_bytes=4096)
    for k, o in enumerate(out):
        assert o.sharding == layer[k].sharding
        for shard in o.addressable_shards:
            assert_bytes_equal(shard.data, _rank_layer(host, mesh, shard, t, i_local)[k],
                               f"{NAMES[k]} on {shard.device}")


# --- separate gate and up ------------------------------------------------------------------

def _separate(host, names=("w1_weight", "w1_weight_scale", "w3_weight", "w3_weight_scale",
                           "w2_weight", "w2_weight_scale")):
    gate, up = _halves(host[0])
    gate_s, up_s = _halves(host[1])
    arrays = to_jax([gate, gate_s, up, up_s, host[2], host[3]])
    arrays[3] = jax.lax.bitcast_convert_type(jnp.asarray(up_s), jnp.float8_e4m3fn)
    arrays[1] = jax.lax.bitcast_convert_type(jnp.asarray(gate_s), jnp.float8_e4m3fn)
    return dict(zip(names, arrays))


@pytest.mark.parametrize("donate", [True, False])
def test_separate_gate_up_in_a_dict(rng, donate):
    host = random_layer(rng, 2, 256, 64)
    moe = _separate(host)
    moe["router"] = jnp.ones(3)
    out = jax_nvfp4.prepare({"moe": moe}, donate=donate)["moe"]
    assert isinstance(out, jax_nvfp4.PreparedLayer)
    assert set(out) == set(NAMES) | {"router", "nvfp4_layout"}  # the kernel's keys
    assert out["router"] is moe["router"]
    for name, want in zip(NAMES, _reference.prepare_layer(*host)):
        assert_bytes_equal(out[name], want, name)
    assert all(moe[n].is_deleted() == donate for n in moe if n != "router")
    assert (out.hidden_size, out.intermediate_size) == (256, 64)


def test_separate_gate_up_with_model_names(rng):
    host = random_layer(rng, 2, 256, 64)
    names = ("gate_proj", "gate_proj_scale", "up_proj", "up_proj_scale", "down_proj",
             "down_proj_scale")
    keys = dict(zip(("w1_weight", "w1_weight_scale", "w3_weight", "w3_weight_scale",
                     "w2_weight", "w2_weight_scale"), names))
    keys.update(w13_weight="gate_up_proj", w13_weight_scale="gate_up_proj_scale")
    out = jax_nvfp4.prepare({"experts": _separate(host, names)}, keys=keys)["experts"]
    assert set(out) == {"gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale",
                        "nvfp4_layout"}
    for name, want in zip(("gate_up_proj", "gate_up_proj_scale", "down_proj",
                           "down_proj_scale"), _reference.prepare_layer(*host)):
        assert_bytes_equal(out[name], want, name)


def test_fuse_gate_up_helper_and_its_memory(rng):
    host = random_layer(rng, 4, 256, 64)
    gate, up = (jnp.asarray(x) for x in _halves(host[0]))
    gate_s, up_s = (jax.lax.bitcast_convert_type(jnp.asarray(x), jnp.float8_e4m3fn)
                    for x in _halves(host[1]))
    w13, s13 = jax_nvfp4.fuse_gate_up(gate, gate_s, up, up_s)
    assert_bytes_equal(w13, host[0], "w13")
    assert_bytes_equal(s13, host[1], "w13 scale")
    assert all(x.is_deleted() for x in (gate, gate_s, up, up_s))  # freed right after
    # the program writes one new buffer per output and needs no other scratch
    from jax_nvfp4.tree import fuse as _fuse
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (gate, gate_s, up, up_s)]
    stats = _fuse._fuse_program(None).lower(*args).compile().memory_analysis()
    if stats is not None:
        # (plus the output tuple's table of pointers)
        assert 0 <= stats.output_size_in_bytes - (host[0].nbytes + host[1].nbytes) <= 64
        assert stats.temp_size_in_bytes <= 1024
    with pytest.raises(ValueError, match="up: expected the shape of gate"):
        jax_nvfp4.fuse_gate_up(*(jnp.asarray(x) for x in (host[0][:, :64], host[1][:, :64],
                                                          host[0][:, :32], host[1][:, :64])))


def test_separate_gate_up_refusals(rng):
    host = random_layer(rng, 2, 256, 64)
    moe = _separate(host)
    moe["w3_weight"] = moe["w3_weight"][:, :16]
    with pytest.raises(ValueError, match=r"params\['moe'\]\.w3_weight: expected the shape of "
                                         r"params\['moe'\]\.w1_weight"):
        jax_nvfp4.prepare({"moe": moe})
    assert not any(x.is_deleted() for x in moe.values())
    moe = _separate(host)
    moe["w2_weight"] = moe["w2_weight"][:, :128]  # w2 checked against the fused w13
    with pytest.raises(ValueError, match=r"params\['moe'\]\.w2_weight"):
        jax_nvfp4.prepare({"moe": moe})
    assert not any(x.is_deleted() for x in moe.values())
    with pytest.raises(ValueError, match="need gated=True"):
        jax_nvfp4.prepare({"moe": _separate(host)}, gated=False)
    both = _separate(host)
    both.update(zip(NAMES[:2], to_jax(host)[:2]))
    with pytest.raises(ValueError, match="both a fused w13"):
        jax_nvfp4.prepare({"moe": both})


def test_separate_gate_up_in_a_fixed_container_is_refused(rng):
    import typing

    class Unfused(typing.NamedTuple):
        w1_weight: jax.Array
        w1_weight_scale: jax.Array
        w3_weight: jax.Array
        w3_weight_scale: jax.Array
        w2_weight: jax.Array
        w2_weight_scale: jax.Array

    layer = Unfused(*_separate(random_layer(rng, 2, 256, 64)).values())
    with pytest.raises(ValueError, match=r"params\['moe'\]: separate gate and up .* in a "
                                         r"Unfused cannot become one w13.*fuse_gate_up"):
        jax_nvfp4.prepare({"moe": layer})
    assert not any(x.is_deleted() for x in layer)


def test_swap_runs_in_place_with_one_chunk_of_scratch():
    """The gate_up swap is one jitted program over the donated w13 and scales: aliased
    (no second copy) with at most one chunk of experts as scratch."""
    from jax_nvfp4.tree import fuse as _fuse
    e, r, k = 16, 256, 512
    args = [jax.ShapeDtypeStruct((e, r, k), jnp.uint8),
            jax.ShapeDtypeStruct((e, r, k // 8), jnp.float8_e4m3fn)]
    program = _fuse._rows_program(("swap",), (2, 2), True, None)
    stats = program.lower(*args).compile().memory_analysis()
    if stats is None:
        pytest.skip("no memory analysis on this backend")
    assert stats.alias_size_in_bytes == e * r * k + e * r * k // 8
    assert stats.temp_size_in_bytes <= 2 * 2 * r * k  # a chunk (and its swapped copy)


@pytest.mark.parametrize("split_i", [False, True], ids=["experts-split", "I-split"])
def test_separate_gate_up_sharded_fused_on_each_device(rng, split_i):
    host, mesh, t, i_local = _tp_setup(rng)
    rows, cols = (P("e", "t"), P("e", None, "t")) if split_i else (P("e"), P("e"))
    moe = _separate(host)
    for n in moe:
        moe[n] = jax.device_put(moe[n], NamedSharding(mesh, cols if n.startswith("w2") else rows))
    out = jax_nvfp4.prepare({"moe": moe}, chunk_bytes=4096)["moe"]
    for k, name in enumerate(NAMES):
        assert out[name].sharding.is_equivalent_to(
            NamedSharding(mesh, cols if k > 1 else rows), 3)
        if not split_i:
            assert_bytes_equal(out[name], _reference.prepare_layer(*host)[k], name)
            continue
        for shard in out[name].addressable_shards:  # each device: its own rank's layer
            assert_bytes_equal(shard.data, _rank_layer(host, mesh, shard, t, i_local)[k],
                               f"{name} on {shard.device}")


def test_a_failure_after_fusing_keeps_the_fused_layer(rng, monkeypatch):
    """The halves are consumed by the fusion: if the layout then fails (out of memory), the
    error's params hold the fused, unprepared w13, so a resume loses nothing."""
    from jax_nvfp4.tree import prepare as _tree
    host = random_layer(rng, 2, 256, 64)
    moe = _separate(host)

    def fail(job):
        raise MemoryError("RESOURCE_EXHAUSTED")

    monkeypatch.setattr(_tree, "run_job", fail)
    with pytest.raises(jax_nvfp4.PrepareError) as info:
        jax_nvfp4.prepare({"moe": moe})
    kept = info.value.params["moe"]
    assert set(kept) == set(NAMES)
    for name, want in zip(NAMES, host):  # the checkpoint layout, [up; gate]
        assert_bytes_equal(kept[name], want, name)
    monkeypatch.undo()
    out = jax_nvfp4.prepare(info.value.params, skip_prepared=True)
    for name, want in zip(NAMES, _reference.prepare_layer(*host)):
        assert_bytes_equal(out["moe"][name], want, name)
