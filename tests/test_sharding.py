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
from jax_nvfp4 import _prepare, _reference, _sharding
from jax_nvfp4._spec import NAMES
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
    # One XLA-owned buffer per shard: on CPU, device_put may alias numpy memory (from
    # every replica), and donation then copies instead of working in place.
    return [jax.make_array_from_callback(h.shape, NamedSharding(mesh, s),
                                         lambda idx, h=h: jnp.array(h[idx]))
            for h, s in zip(host, specs)]


def _pointers(x):
    return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]


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
    pointers = [_pointers(x) for x in layer]

    out = jax_nvfp4.prepare_layer(*layer, donate=donate, chunk_bytes=4096)

    for name, o, w, s in zip(NAMES, out, want, shardings):
        assert o.sharding == s, name
        _assert_shards_equal(o, w, name)
    if donate:
        assert all(x.is_deleted() for x in layer)
        assert [_pointers(o) for o in out] == pointers  # in place on every device
    else:
        for x, h in zip(layer, host):
            _assert_shards_equal(x, h, "input")
    back = jax_nvfp4.unprepare_layer(*out, donate=donate, chunk_bytes=4096)
    for name, b, h, s in zip(NAMES, back, host, shardings):
        assert b.sharding == s, name
        _assert_shards_equal(b, h, name)
    if donate:
        assert [_pointers(b) for b in back] == pointers


@pytest.mark.parametrize("spec", [P("b"), P(("a", "b")), _tp_specs("a", "b")], ids=str)
@pytest.mark.parametrize("inverse", [False, True])
def test_compiled_program_is_local_with_no_collectives(spec, inverse):
    mesh = _mesh((2, 4), ("a", "b"))
    specs = (spec,) * 4 if isinstance(spec, P) else spec
    host_shapes = jax_nvfp4._spec.LayerSpec(16, 256, 256, True).shapes(padded=False)
    args = [jax.ShapeDtypeStruct(s, jnp.uint8, sharding=NamedSharding(mesh, p))
            for s, p in zip(host_shapes, specs)]
    plan = _sharding.plan(args, gated=True, prepared=inverse)
    local_shapes = [NamedSharding(mesh, p).shard_shape(s) for s, p in zip(host_shapes, specs)]
    assert plan.local.shapes(padded=False) == tuple(local_shapes)
    chunks = _prepare.experts_per_chunk(plan.local, 4096)
    hlo = _prepare._compiled(plan.local, inverse, True, chunks, plan).lower(*args).compile()
    text = hlo.as_text()
    assert "dynamic-update-slice" in text  # the in-place loop, on...
    for s in local_shapes:  # ...each device's local block
        assert f"u8[{','.join(map(str, s))}]" in text
    assert not COLLECTIVES.findall(text)
    assert hlo.memory_analysis().alias_size_in_bytes == plan.local.nbytes


@pytest.mark.parametrize("i_local", [64, 48], ids=["in-place", "padded"])
def test_tensor_parallel_slice_is_its_own_layer(rng, i_local):
    """I split over "t": each device's w13 rows are its own [up; gate] with the local I."""
    t = 4
    host = random_layer(rng, 4, 128, t * i_local)  # any bytes: the global order is per device
    mesh = _mesh((2, t), ("e", "t"))
    layer = _put(host, _tp_specs("e", "t"), mesh)
    shardings = [x.sharding for x in layer]
    pointers = [_pointers(x) for x in layer]
    index = [{x.device: x.index for x in a.addressable_shards} for a in layer]

    out = jax_nvfp4.prepare_layer(*layer, chunk_bytes=4096)

    assert all(x.is_deleted() for x in layer)
    ip = -(-i_local // 64) * 64
    assert out[0].shape == (4, t * 2 * ip, 64) and out[2].shape == (4, 128, t * ip // 2)
    for k, (o, s) in enumerate(zip(out, shardings)):
        assert o.sharding == s
        for shard in o.addressable_shards:
            # the same device's input slices of the four arrays, prepared as one layer
            local = [h[ix[shard.device]] for h, ix in zip(host, index)]
            want = _reference.prepare_layer(*local)[k]
            assert_bytes_equal(shard.data, want, f"{NAMES[k]} on {shard.device}")
    if ip == i_local:
        assert [_pointers(o) for o in out] == pointers
