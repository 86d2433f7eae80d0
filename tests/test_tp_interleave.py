"""tp_interleave: a checkpoint's w13 reordered so that each TP rank's rows are its own layer,
checked against what a TP server's rank holds (vLLM's slicing) through the sharded prepare."""

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


def _rank(host, tp, j, e):
    """Rank j's own layer of expert e: rows j of up and of gate, columns j of w2."""
    w13, s13, w2, s2 = host
    i = w13.shape[1] // 2
    n = i // tp
    up, gate = slice(j * n, (j + 1) * n), slice(i + j * n, i + (j + 1) * n)
    return [np.concatenate([w13[e, up], w13[e, gate]], axis=0)[None],
            np.concatenate([s13[e, up], s13[e, gate]], axis=0)[None],
            w2[e:e + 1, :, j * n // 2:(j + 1) * n // 2],
            s2[e:e + 1, :, j * n // 16:(j + 1) * n // 16]]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_numpy_and_jax_agree_with_the_formula(rng, tp):
    w13, s13, _, _ = random_layer(rng, 3, 256, 128)
    e, r1, k = w13.shape
    want = w13.reshape(e, 2, tp, r1 // (2 * tp), k).swapaxes(1, 2).reshape(e, r1, k)
    got_np = jax_nvfp4.tp_interleave(w13, s13, tp=tp)
    assert isinstance(got_np[0], np.ndarray)
    assert_bytes_equal(got_np[0], want, "numpy")
    x = jax.jit(jnp.copy)(jnp.asarray(w13))
    s = jax.lax.bitcast_convert_type(jax.jit(jnp.copy)(jnp.asarray(s13)), jnp.float8_e4m3fn)
    got = jax_nvfp4.tp_interleave(x, s, tp=tp, donate=True, chunk_bytes=4096)
    assert_bytes_equal(got[0], want, "jax")
    assert_bytes_equal(got[1], np.asarray(got_np[1]), "jax scales")
    if tp > 1:
        assert x.is_deleted()


@pytest.mark.parametrize("i_local", [64, 48], ids=["in-place", "padded"])
def test_each_rank_prepares_its_own_layer(rng, i_local):
    devices = jax.devices("cpu")[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 CPU devices (conftest.py)")
    tp = 4
    host = random_layer(rng, 4, 256, tp * i_local)  # the checkpoint's layer, [up; gate]
    w13, s13 = jax_nvfp4.tp_interleave(host[0], host[1], tp=tp)
    mesh = jax.make_mesh((2, tp), ("e", "t"), devices=devices)
    specs = (P("e", "t"), P("e", "t"), P("e", None, "t"), P("e", None, "t"))
    layer = [jax.device_put(x, NamedSharding(mesh, s))
             for x, s in zip(to_jax([w13, s13, host[2], host[3]]), specs)]
    out = jax_nvfp4.prepare_layer(*layer, chunk_bytes=4096)
    for k, o in enumerate(out):
        for shard in o.addressable_shards:
            j = int(np.argwhere(mesh.devices == shard.device)[0][1])
            for n, e in enumerate(range(*shard.index[0].indices(4))):
                want = _reference.prepare_layer(*_rank(host, tp, j, e))[k][0]
                assert_bytes_equal(np.asarray(shard.data)[n], want,
                                   f"{NAMES[k]} expert {e} rank {j}")


def test_refusals(rng):
    w13, s13, _, _ = random_layer(rng, 2, 256, 96)
    with pytest.raises(ValueError, match="does not split into tp = 5"):
        jax_nvfp4.tp_interleave(w13, s13, tp=5)
    with pytest.raises(ValueError, match="tp must be a positive int"):
        jax_nvfp4.tp_interleave(w13, s13, tp=0)
    with pytest.raises(ValueError, match="w13_weight_scale: expected"):
        jax_nvfp4.tp_interleave(w13, s13[:, :32], tp=2)
    devices = jax.devices("cpu")[:2]
    mesh = jax.make_mesh((2,), ("t",), devices=devices)
    split = jax.device_put(jnp.asarray(w13), NamedSharding(mesh, P(None, "t")))
    with pytest.raises(ValueError, match="already split over devices"):
        jax_nvfp4.tp_interleave(split, jnp.asarray(s13), tp=2)
