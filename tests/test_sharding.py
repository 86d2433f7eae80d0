"""Layers sharded over a mesh: each device prepares its own shard, in place, with no communication.

Runs on the eight virtual CPU devices that conftest.py asks for.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_nvfp4
from jax_nvfp4 import transform as _prepare
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.tree import sharding as _sharding
from jax_nvfp4.layout.spec import NAMES
from helpers import assert_bytes_equal, random_layer

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 CPU devices (see conftest.py)")
COLLECTIVES = re.compile(r"all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter"
                         r"|collective-broadcast|send|recv")


def _mesh(shape, names, explicit=True):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape),
                         devices=CPUS[:int(np.prod(shape))])


def _put(host, specs, mesh, scales=ml_dtypes.float8_e4m3fn):
    """numpy uint8 layer -> arrays with ``NamedSharding(mesh, spec)``, scales as ``scales``."""
    if isinstance(specs, P):
        specs = (specs,) * 4
    host = [h if k % 2 == 0 else h.view(scales) for k, h in enumerate(host)]
    # One XLA-owned buffer per shard (a jitted copy): on CPU, device_put may alias numpy
    # or other host memory, and donation then copies instead of working in place.
    return [jax.jit(jnp.copy, out_shardings=NamedSharding(mesh, s))(
                jax.device_put(h, NamedSharding(mesh, s)))
            for h, s in zip(host, specs)]


def _pointers(x):
    return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]


def _weight_pointers(arrays):
    """Shard pointers of the two weight arrays. Float8 scales are left out here: XLA's
    CPU backend moves float8 through float16, and jax 0.11 then gives the sharded program
    fresh scale buffers. On GPU the scales stay in place (tests/test_gpu_*.py, and
    benchmarks/sharded.py measures one chunk of extra memory per device)."""
    return [_pointers(arrays[0]), _pointers(arrays[2])]


def _assert_shards_equal(got, want, what):
    """Every addressable shard of ``got`` holds the bytes of ``want`` at its index."""
    assert len(got.addressable_shards) > 0
    for shard in got.addressable_shards:
        assert_bytes_equal(shard.data, np.asarray(want).view(np.uint8)[shard.index],
                           f"{what} on {shard.device}")


def _tp_specs(e, t):
    """Experts over ``e``, I over ``t``: w13 rows and w2 columns."""
    return (P(e, t), P(e, t), P(e, None, t), P(e, None, t))


MESHES = [
    pytest.param((4,), ("x",), P("x"), True, id="4-explicit"),
    pytest.param((2, 4), ("a", "b"), P("b"), True, id="2x4-experts-over-b"),
    pytest.param((2, 4), ("a", "b"), P(("a", "b")), False, id="2x4-experts-over-ab-auto"),
    pytest.param((8,), ("x",), P("x"), False, id="8-auto"),
    pytest.param((2, 4), ("a", "b"), P(), True, id="2x4-replicated"),
]


@pytest.mark.parametrize("donate", [True, False], ids=["donated", "kept"])
@pytest.mark.parametrize("shape, names, spec, explicit", MESHES)
def test_each_device_prepares_its_experts(rng, shape, names, spec, explicit, donate):
    host = random_layer(rng, 16, 256, 128)
    want = jax_nvfp4.prepare_layer(*_put(host, P(), _mesh((1,), ("x",))), donate=False)
    mesh = _mesh(shape, names, explicit)
    layer = _put(host, spec, mesh)
    shardings = [x.sharding for x in layer]
    pointers = _weight_pointers(layer)

    out = jax_nvfp4.prepare_layer(*layer, donate=donate, chunk_bytes=4096)

    for name, o, w, s in zip(NAMES, out, want, shardings):
        assert o.sharding == s, name
        _assert_shards_equal(o, w, name)
    if donate:
        assert all(x.is_deleted() for x in layer)
        assert _weight_pointers(out) == pointers  # in place on every device
    else:
        for x, h in zip(layer, host):
            _assert_shards_equal(x, h, "input")
    back = jax_nvfp4.unprepare_layer(*out, donate=donate, chunk_bytes=4096)
    for name, b, h, s in zip(NAMES, back, host, shardings):
        assert b.sharding == s, name
        _assert_shards_equal(b, h, name)
    if donate:
        assert _weight_pointers(back) == pointers


@pytest.mark.parametrize("spec", [P("b"), P(("a", "b")), _tp_specs("a", "b")], ids=str)
@pytest.mark.parametrize("inverse", [False, True])
def test_compiled_program_is_local_with_no_collectives(spec, inverse):
    mesh = _mesh((2, 4), ("a", "b"))
    specs = (spec,) * 4 if isinstance(spec, P) else spec
    host_shapes = jax_nvfp4.layout.spec.LayerSpec(16, 256, 256, True).shapes(padded=False)
    args = [jax.ShapeDtypeStruct(s, jnp.uint8, sharding=NamedSharding(mesh, p))
            for s, p in zip(host_shapes, specs)]
    plan = _sharding.plan(args, gated=True, prepared=inverse)
    local_shapes = [NamedSharding(mesh, p).shard_shape(s) for s, p in zip(host_shapes, specs)]
    assert plan.local.shapes(padded=False) == tuple(local_shapes)
    chunks = _prepare.experts_per_chunk(plan.local, 4096)
    hlo = _prepare.compiled(plan.local, inverse=inverse, donate=True, chunks=chunks,
                            plan=plan).lower(*args).compile()
    text = hlo.as_text()
    assert "dynamic-update-slice" in text  # the in-place loop, on...
    for s in local_shapes:  # ...each device's local block
        assert f"u8[{','.join(map(str, s))}]" in text
    assert not COLLECTIVES.findall(text)
    assert hlo.memory_analysis().alias_size_in_bytes == plan.local.nbytes


def _tp_w13(x, tp):
    """A checkpoint's w13 ``[up; gate]`` laid out for ``tp`` shards: ``[up_0; gate_0; up_1; ...]``
    (the recipe of the README)."""
    e, r1, k = x.shape
    return x.reshape(e, 2, tp, r1 // (2 * tp), k).swapaxes(1, 2).reshape(e, r1, k)


@pytest.mark.parametrize("i_local", [64, 48], ids=["in-place", "padded"])
def test_tensor_parallel_slice_is_its_own_layer(rng, i_local):
    """I split over "t": each device prepares its TP rank's slice of the checkpoint as a layer."""
    t, i = 4, 4 * i_local
    w13, s13, w2, s2 = random_layer(rng, 4, 128, i)  # the checkpoint's layer, global I
    mesh = _mesh((2, t), ("e", "t"))
    layer = _put([_tp_w13(w13, t), _tp_w13(s13, t), w2, s2], _tp_specs("e", "t"), mesh)
    shardings = [x.sharding for x in layer]
    pointers = _weight_pointers(layer)

    # hidden_alignment=128: H = 128 unpadded, so the unpadded-I case runs in place
    out = jax_nvfp4.prepare_layer(*layer, chunk_bytes=4096, hidden_alignment=128)

    assert all(x.is_deleted() for x in layer)
    ip = -(-i_local // 64) * 64
    assert out[0].shape == (4, t * 2 * ip, 64) and out[2].shape == (4, 128, t * ip // 2)
    for k, (o, s) in enumerate(zip(out, shardings)):
        assert o.sharding == s
        for shard in o.addressable_shards:
            # what rank j of a TP server holds (vLLM's slicing of the checkpoint), prepared
            e, j = shard.index[0], int(np.argwhere(mesh.devices == shard.device)[0][1])
            up = slice(j * i_local, (j + 1) * i_local)
            gate = slice(i + j * i_local, i + (j + 1) * i_local)
            local = [np.concatenate([w13[e, up], w13[e, gate]], axis=1),
                     np.concatenate([s13[e, up], s13[e, gate]], axis=1),
                     w2[e, :, j * i_local // 2:(j + 1) * i_local // 2],
                     s2[e, :, j * i_local // 16:(j + 1) * i_local // 16]]
            want = _reference.prepare_layer(*local, hidden_alignment=128)[k]
            assert_bytes_equal(shard.data, want, f"{NAMES[k]} on {shard.device}")
    if ip == i_local:
        assert _weight_pointers(out) == pointers


def test_collective_check_sees_communication():
    """Control for the HLO check above: a program that moves experts between devices."""
    mesh = _mesh((8,), ("x",), explicit=False)
    arg = jax.ShapeDtypeStruct((16, 4), jnp.uint8, sharding=NamedSharding(mesh, P("x")))
    text = jax.jit(lambda x: jnp.roll(x, 1, axis=0)).lower(arg).compile().as_text()
    assert COLLECTIVES.findall(text)


def _model(rng, mesh, layers=2):
    host, params = [], {"embed": jnp.ones((4, 4)), "layers": []}
    for k in range(layers):
        arrays = random_layer(rng, 8, 128, 64)
        host.append(arrays)
        moe = dict(zip(NAMES, _put(arrays, P("x"), mesh)))
        moe["router"] = jnp.ones(8)
        params["layers"].append({"moe": moe, "name": f"layer{k}"})
    return params, host


def test_prepare_tree_of_sharded_layers(rng):
    mesh = _mesh((4,), ("x",))
    params, host = _model(rng, mesh)
    inputs = [dict(layer["moe"]) for layer in params["layers"]]
    out = jax_nvfp4.prepare(params)
    for k, arrays in enumerate(host):
        moe = out["layers"][k]["moe"]
        assert isinstance(moe, jax_nvfp4.PreparedLayer)
        assert moe["router"] is inputs[k]["router"]
        for name, want in zip(NAMES, _reference.prepare_layer(*arrays)):
            assert moe[name].sharding == inputs[k][name].sharding
            assert inputs[k][name].is_deleted()
            _assert_shards_equal(moe[name], want, name)
    with pytest.raises(ValueError, match="already in the TRT-LLM layout"):
        jax_nvfp4.prepare(out)


def _refused(layer, match, **kw):
    with pytest.raises(ValueError, match=match):
        jax_nvfp4.prepare_layer(*layer, **kw)
    assert not any(x.is_deleted() for x in layer if isinstance(x, jax.Array))


def test_refusals_leave_the_arrays_alive(rng):
    mesh = _mesh((2, 4), ("a", "b"))
    host = random_layer(rng, 8, 256, 128)
    _refused(_put(host, P(None, None, "b"), mesh),
             r"w13_weight: the hidden axis \(axis 2\) is split over mesh axes \('b',\)")
    _refused(_put(host, (P(), P(), P(None, "b"), P(None, "b")), mesh),
             r"w2_weight: the hidden axis \(axis 1\)")
    _refused(_put(host, (P("a"), P("a"), P("b"), P("b")), mesh),
             r"w2_weight: expert axis 0 is split over mesh axes \('b',\), but w13_weight's "
             r"is split over mesh axes \('a',\)")
    _refused(_put(host, (P("a", "b"), P("a", "b"), P("a"), P("a")), mesh),
             r"w2_weight: the intermediate axis \(axis 2\) is unsplit, but w13_weight's rows "
             r"are split over mesh axes \('b',\)")
    mixed = _put(host, P("b"), mesh)
    mixed[3] = jnp.asarray(host[3]).view(jnp.float8_e4m3fn)
    _refused(mixed, "w2_weight_scale: expected a NamedSharding on the mesh of w13_weight")
    other = _mesh((4,), ("b",))
    mixed[3] = _put(host, P("b"), other)[3]
    _refused(mixed, "w2_weight_scale: expected a NamedSharding on the mesh of w13_weight")
    # a prepared size globally (I = 128) but not per device (I = 32 over "b")
    with pytest.raises(ValueError, match=r"each device's shard is prepared as its own layer "
                                         r"\(I split over mesh axes \('b',\).*I = 32 is not a "
                                         "prepared size"):
        jax_nvfp4.unprepare_layer(*_put(host, _tp_specs(None, "b"), mesh))


@pytest.mark.parametrize("e, i, specs, match", [
    (6, 64, (P("b"),) * 4, r"w13_weight: axis 0 has 6 experts, which cannot be split evenly "
                           r"over 4 shards \(mesh axes \('b',\)\)"),
    # I = 64 over 8 devices would leave half of a 16-value scale column to each
    (8, 64, _tp_specs(None, ("a", "b")),
     r"w2_weight_scale: axis 2 has 4 entries, which cannot be split evenly over 8 shards "
     r"\(mesh axes \('a', 'b'\)\)"),
], ids=["experts", "scale-columns"])
def test_uneven_shards_are_refused(e, i, specs, match):
    # JAX itself refuses to place such arrays; abstract ones reach the check.
    mesh = _mesh((2, 4), ("a", "b"))
    shapes = jax_nvfp4.layout.spec.LayerSpec(e, 128, i, True).shapes(padded=False)
    args = [jax.ShapeDtypeStruct(s, jnp.uint8, sharding=NamedSharding(mesh, p))
            for s, p in zip(shapes, specs)]
    with pytest.raises(ValueError, match=match):
        jax_nvfp4.prepare_layer(*args)


def test_bad_sharded_layer_in_a_tree_donates_nothing(rng):
    mesh = _mesh((4,), ("x",))
    params, _ = _model(rng, mesh, layers=3)
    bad = params["layers"][2]["moe"]
    bad["w2_weight"] = jax.device_put(bad["w2_weight"], NamedSharding(mesh, P(None, "x")))
    with pytest.raises(ValueError, match=r"params\['layers'\]\[2\]\['moe'\]\.w2_weight: "
                                         "expert axis 0 is unsplit"):
        jax_nvfp4.prepare(params)
    for layer in params["layers"]:
        assert not any(layer["moe"][n].is_deleted() for n in NAMES)


def test_uint8_scales_come_back_float8_with_their_sharding(rng):
    mesh = _mesh((8,), ("x",), explicit=False)
    host = random_layer(rng, 8, 128, 64)
    layer = _put(host, P("x"), mesh, scales=np.uint8)
    out = jax_nvfp4.prepare_layer(*layer)
    for name, o, x, want in zip(NAMES, out, layer, _reference.prepare_layer(*host)):
        assert o.dtype == (jnp.float8_e4m3fn if name.endswith("scale") else jnp.uint8)
        assert o.sharding.is_equivalent_to(x.sharding, 3), name
        _assert_shards_equal(o, want, name)


def test_the_default_device_is_still_the_first():
    """conftest.py's eight devices leave unsharded work on one device, as before."""
    assert jnp.zeros(3).devices() == {jax.devices()[0]}
