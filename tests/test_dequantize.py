"""dequantize_layer: the float values of a layer, the same from either layout.

Scales are random bytes, so some are NaN in float8_e4m3fn (0x7f, 0xff): results
are compared NaN-aware (NaN at the same places) and bit for bit elsewhere (so
-0.0 != +0.0). The products are exact in float32 (2 x 4 significant bits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4.layout.spec import LayerSpec
from helpers import random_layer, to_jax


def e2m1_numpy(nibbles: np.ndarray) -> np.ndarray:
    """e2m1 from its bits: sign (bit 3), exponent (bits 2-1, bias 1), mantissa (bit 0)."""
    sign, exp, man = nibbles >> 3, (nibbles >> 1) & 3, nibbles & 1
    magnitude = np.where(exp == 0, 0.5 * man, 2.0 ** (exp.astype(np.int32) - 1) * (1 + 0.5 * man))
    return np.where(sign == 1, -magnitude, magnitude).astype(np.float32)


def dequantize_numpy(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Independent reference: nibble decode (low = even element) times the block scale."""
    weight = np.asarray(weight).view(np.uint8)
    values = np.empty((*weight.shape[:-1], 2 * weight.shape[-1]), np.float32)
    values[..., 0::2] = e2m1_numpy(weight & 0xF)
    values[..., 1::2] = e2m1_numpy(weight >> 4)
    scales = np.asarray(scale).view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return values * np.repeat(scales, 16, axis=-1)


def assert_same_floats(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32 and got.shape == want.shape, (what, got.dtype, got.shape)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN at different places"
    bad = np.argwhere((got.view(np.uint32) != want.view(np.uint32)) & ~nan)
    assert bad.size == 0, f"{what}: {len(bad)} values differ, first at {bad[0].tolist()}"


def unpad(w13, w2, i: int, *, gated: bool, h: int | None = None):
    """Drop the zero rows/columns prepare_layer added (as the docstring says)."""
    e, r1, hp = w13.shape
    if gated:
        ip = r1 // 2
        w13 = w13.reshape(e, 2, ip, hp)[:, :, :i].reshape(e, 2 * i, hp)
    else:
        w13 = w13[:, :i]
    h = hp if h is None else h
    return w13[..., :h], w2[:, :h, :i]


def test_e2m1_table():
    assert e2m1_numpy(np.arange(16)).tolist() == [
        0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert np.signbit(e2m1_numpy(np.array([8]))).all()


@pytest.mark.parametrize("e, h, i, gated", [(3, 256, 48, True), (2, 128, 128, False)])
@pytest.mark.parametrize("scale_dtype", [jnp.float8_e4m3fn, jnp.uint8])
def test_linear_matches_numpy(rng, e, h, i, gated, scale_dtype):
    host = random_layer(rng, e, h, i, gated=gated)
    w13, w2 = jax_nvfp4.dequantize_layer(*to_jax(host, scale_dtype), gated=gated)
    spec = LayerSpec(e, h, i, gated)
    assert w13.shape == (e, spec.shapes(padded=False)[0][1], h) and w2.shape == (e, h, i)
    assert_same_floats(w13, dequantize_numpy(host[0], host[1]), "w13")
    assert_same_floats(w2, dequantize_numpy(host[2], host[3]), "w2")


def test_numpy_arrays_are_accepted(rng):
    host = random_layer(rng, 2, 128, 64, gated=True)
    scales = [host[k].view(ml_dtypes.float8_e4m3fn) for k in (1, 3)]
    w13, w2 = jax_nvfp4.dequantize_layer(host[0], scales[0], host[2], scales[1])
    assert_same_floats(w13, dequantize_numpy(host[0], host[1]), "w13")
    assert_same_floats(w2, dequantize_numpy(host[2], host[3]), "w2")


@pytest.mark.parametrize("e, h, i, gated, align", [
    (3, 256, 128, True, 256),
    (2, 128, 128, False, 128),
    (2, 128, 96, True, 128),    # I padded to 128
    (2, 256, 64, False, 256),   # I padded to 128
    (2, 128, 128, True, 256),   # H padded to 256
    (2, 208, 96, False, 256),   # H padded to 256, I to 128
])
def test_trtllm_matches_linear(rng, e, h, i, gated, align):
    host = random_layer(rng, e, h, i, gated=gated)
    want = jax_nvfp4.dequantize_layer(*to_jax(host), gated=gated)
    prepared = jax_nvfp4.prepare_layer(*to_jax(host), gated=gated, donate=False,
                                       hidden_alignment=align)
    got = jax_nvfp4.dequantize_layer(*prepared, gated=gated, layout="trtllm")
    spec = LayerSpec(e, h, i, gated, hidden_alignment=align)
    ip, hp = spec.padded_i, spec.padded_h
    assert got[0].shape == (e, 2 * ip if gated else ip, hp) and got[1].shape == (e, hp, ip)
    w13, w2 = unpad(*(np.asarray(x) for x in got), i, gated=gated, h=h)
    assert_same_floats(w13, want[0], "w13")
    assert_same_floats(w2, want[1], "w2")
    # What unpad dropped is the padding: +0.0 (zero bytes, zero scales).
    r13 = np.asarray(got[0]).reshape(e, 2 if gated else 1, ip, hp)
    w2p = np.asarray(got[1])
    for pad in (r13[:, :, i:], r13[..., h:], w2p[..., i:], w2p[:, h:]):
        assert (pad.view(np.uint32) == 0).all()


def test_reading_prepared_arrays_as_linear_is_refused(rng):
    prepared = jax_nvfp4.prepare_layer(*to_jax(random_layer(rng, 2, 128, 64)), donate=False)
    with pytest.raises(ValueError, match="layout='trtllm'"):
        jax_nvfp4.dequantize_layer(*prepared)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layout="swizzled"), ValueError, "layout must be one of"),
    (dict(gated=1), TypeError, "gated must be a bool"),
    (dict(gated=False), ValueError, "w13_weight: with gated=False"),
])
def test_refusals(rng, kwargs, error, match):
    layer = to_jax(random_layer(rng, 2, 128, 64))
    with pytest.raises(error, match=match):
        jax_nvfp4.dequantize_layer(*layer, **kwargs)


def test_trtllm_needs_a_prepared_size(rng):
    layer = to_jax(random_layer(rng, 2, 128, 96))  # gated I = 96 is always padded
    with pytest.raises(ValueError, match="not a prepared size"):
        jax_nvfp4.dequantize_layer(*layer, layout="trtllm")


def test_under_jit(rng):
    host = random_layer(rng, 2, 128, 64, gated=True)
    prepared = jax_nvfp4.prepare_layer(*to_jax(host), donate=False, hidden_alignment=128)
    fn = jax.jit(functools.partial(jax_nvfp4.dequantize_layer, layout="trtllm"))
    got = fn(*prepared)
    assert_same_floats(got[0], dequantize_numpy(host[0], host[1]), "w13")
    assert_same_floats(got[1], dequantize_numpy(host[2], host[3]), "w2")
    with pytest.raises(ValueError, match="w13_weight: with gated=False"):
        jax.jit(functools.partial(jax_nvfp4.dequantize_layer, gated=False))(*prepared)


def test_expert_sharded_inputs_stay_sharded(rng):
    n = 2  # of the virtual CPU devices that tests/conftest.py sets up
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:n]), ("experts",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("experts"))
    host = random_layer(rng, 2 * n, 128, 64, gated=True)
    prepared = jax_nvfp4.prepare_layer(*to_jax(host), donate=False, hidden_alignment=128)
    sharded = [jax.device_put(x, sharding) for x in prepared]
    got = jax.jit(functools.partial(jax_nvfp4.dequantize_layer, layout="trtllm"))(*sharded)
    for x in got:
        assert x.sharding.is_equivalent_to(sharding, x.ndim)
    assert_same_floats(got[0], dequantize_numpy(host[0], host[1]), "w13")
    assert_same_floats(got[1], dequantize_numpy(host[2], host[3]), "w2")


@pytest.mark.parametrize("layout", ["linear", "trtllm"])
def test_explicit_mesh_expert_sharded(rng, layout):
    """jax.make_mesh (explicit axes by default on new jax), outside jit: per device."""
    mesh = jax.make_mesh((4,), ("expert",), devices=jax.devices("cpu")[:4])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    host = random_layer(rng, 8, 128, 64, gated=True)
    arrays = to_jax(host)
    if layout == "trtllm":
        arrays = jax_nvfp4.prepare_layer(*arrays, hidden_alignment=128)
    got = jax_nvfp4.dequantize_layer(*[jax.device_put(x, sharding) for x in arrays],
                                     layout=layout)
    assert got[0].sharding == sharding and got[1].sharding == sharding
    assert_same_floats(got[0], dequantize_numpy(host[0], host[1]), "w13")
    assert_same_floats(got[1], dequantize_numpy(host[2], host[3]), "w2")


def test_tensor_parallel_trtllm_equals_linear(rng):
    """I split over "tp": each device's slice is its own [up; gate] layer (README recipe)."""
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((2, 2), ("expert", "tp"), devices=jax.devices("cpu")[:4])
    specs = (P("expert", "tp"), P("expert", "tp"), P("expert", None, "tp"),
             P("expert", None, "tp"))
    tp, e, h, i = 2, 4, 128, 128
    host = random_layer(rng, e, h, i, gated=True)
    for k in (0, 1):  # [up; gate] -> [up_0; gate_0; up_1; gate_1]
        x = host[k]
        host[k] = x.reshape(e, 2, tp, i // tp, -1).swapaxes(1, 2).reshape(e, 2 * i, -1)
    put = [jax.device_put(x, jax.sharding.NamedSharding(mesh, p))
           for x, p in zip(to_jax(host), specs)]
    linear = jax_nvfp4.dequantize_layer(*put)
    prepared = jax_nvfp4.prepare_layer(*put, donate=False, hidden_alignment=128)
    trtllm = jax_nvfp4.dequantize_layer(*prepared, layout="trtllm")
    assert_same_floats(linear[0], dequantize_numpy(host[0], host[1]), "w13 linear")
    assert_same_floats(trtllm[0], linear[0], "w13")
    assert_same_floats(trtllm[1], linear[1], "w2")
