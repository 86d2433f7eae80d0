"""Bad input is refused before anything is donated, with a message that names the array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
from helpers import random_layer, to_jax


def _assert_alive(layer):
    assert not any(x.is_deleted() for x in layer)


def _assert_refused(arrays, error, match, *, fn=jax_nvfp4.prepare_layer, **kwargs):
    """``fn(*arrays, **kwargs)`` raises ``error`` matching ``match``; nothing was donated."""
    with pytest.raises(error, match=match):
        fn(*arrays, **kwargs)
    _assert_alive(arrays)


def _replace(layer, k, x):
    layer = list(layer)
    layer[k] = x
    return layer


@pytest.fixture
def layer(rng):
    return to_jax(random_layer(rng, 2, 256, 128))


BAD_SHAPES = [
    (0, (2, 256), "w13_weight", "rank 3"),
    (1, (2, 256, 16, 1), "w13_weight_scale", "rank 3"),
    (1, (3, 256, 16), "w13_weight_scale", "expected 2 experts"),
    (2, (2, 384, 64), "w2_weight", "hidden size 256"),
    (3, (2, 256, 4), "w2_weight_scale", "expected shape [2, 256, 8]"),
    (1, (2, 256, 32), "w13_weight_scale", "expected shape [2, 256, 16]"),
    (0, (2, 192, 128), "w13_weight", "2 x I = 256 rows"),
]


@pytest.mark.parametrize("k, shape, name, rule", BAD_SHAPES)
def test_bad_shapes_are_refused_naming_the_array(layer, rng, k, shape, name, rule):
    dtype = layer[k].dtype
    bad = jnp.asarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).view(dtype)
    args = _replace(layer, k, bad)
    with pytest.raises(ValueError) as err:
        jax_nvfp4.prepare_layer(*args)
    assert name in str(err.value) and rule in str(err.value)
    _assert_alive(args)


@pytest.mark.parametrize("k, dtype, name", [
    (0, jnp.int8, "w13_weight"),
    (2, jnp.float8_e4m3fn, "w2_weight"),
    (1, jnp.bfloat16, "w13_weight_scale"),
    (3, jnp.float8_e5m2, "w2_weight_scale"),
])
def test_bad_dtypes_are_type_errors(layer, k, dtype, name):
    args = _replace(layer, k, layer[k].astype(dtype))
    _assert_refused(args, TypeError, name)


def test_hidden_not_multiple_of_16(rng):
    # H = 200 cannot hold whole 16-value scale blocks (192 = 12 x 16 is padded instead)
    e, h, i = 2, 200, 64
    arrays = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in
              [(e, 2 * i, h // 2), (e, 2 * i, 13), (e, h, i // 2), (e, h, i // 16)]]
    layer = to_jax(arrays)
    _assert_refused(layer, ValueError, r"H = 2 x shape\[2\] = 200 must be a multiple of 16")


def test_intermediate_not_multiple_of_16(rng):
    e, h, i = 2, 128, 24
    arrays = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in
              [(e, 2 * i, h // 2), (e, 2 * i, h // 16), (e, h, i // 2), (e, h, 2)]]
    layer = to_jax(arrays)
    _assert_refused(layer, ValueError, "I = 2 x shape.2. = 24 must be a multiple of 16")


def test_gated_mismatch_suggests_the_flag(rng):
    layer = to_jax(random_layer(rng, 2, 128, 128, gated=False))
    _assert_refused(layer, ValueError, "pass gated=False")


@pytest.mark.parametrize("kwargs, error, text", [
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ({"chunk_bytes": 0}, ValueError, "chunk_bytes must be a positive int"),
    ({"chunk_bytes": 1.5}, ValueError, "chunk_bytes must be a positive int"),
    ({"gated": 1}, TypeError, "gated must be a bool"),
    ({"donate": "yes"}, TypeError, "donate must be a bool"),
])
def test_bad_options(layer, kwargs, error, text):
    _assert_refused(layer, error, text, **kwargs)


def test_options_are_keyword_only(layer):
    with pytest.raises(TypeError):
        jax_nvfp4.prepare_layer(*layer, True)
    _assert_alive(layer)


def test_not_an_array(layer):
    with pytest.raises(TypeError, match="w2_weight: expected an array, got list"):
        jax_nvfp4.prepare_layer(layer[0], layer[1], [[1]], layer[3])
    _assert_alive(layer)


def test_deleted_input_is_named(layer):
    layer[2].delete()
    with pytest.raises(ValueError, match="w2_weight has been deleted"):
        jax_nvfp4.prepare_layer(*layer)
    assert not layer[0].is_deleted()


def test_preparing_twice_is_refused(layer):
    out = jax_nvfp4.prepare_layer(*layer)
    _assert_refused(out, ValueError, "already in the TRT-LLM layout")


def test_same_array_twice_is_refused(rng):
    # Non-gated with I == H is the one layer where w13 and w2 share a shape.
    layer = to_jax(random_layer(rng, 2, 128, 128, gated=False))
    with pytest.raises(ValueError, match="distinct"):
        jax_nvfp4.prepare_layer(layer[0], layer[1], layer[0], layer[3], gated=False)
    _assert_alive(layer)


def test_unprepare_refuses_unpadded_sizes(rng):
    layer = to_jax(random_layer(rng, 2, 128, 96))
    _assert_refused(layer, ValueError, "not a prepared size", fn=jax_nvfp4.unprepare_layer)


def test_unprepare_without_donation_keeps_the_mark(layer):
    out = jax_nvfp4.prepare_layer(*layer)
    jax_nvfp4.unprepare_layer(*out, donate=False)  # the prepared arrays stay alive...
    # ...and still refuse a second shuffle
    _assert_refused(out, ValueError, "already in the TRT-LLM layout")


def test_arrays_on_different_devices_are_refused_before_donation(rng, layer):
    cpus = jax.devices("cpu")
    moved = [jax.device_put(x, cpus[1]) if k == 3 else jax.device_put(x, cpus[0])
             for k, x in enumerate(layer)]
    _assert_refused(moved, ValueError, "w2_weight_scale is on .* the same device")


def test_wrapped_arrays_are_refused_naming_the_way_out(rng):
    # nnx.Param has .shape and .dtype, but jit would rebuild the wrapper around tracers.
    nnx = pytest.importorskip("flax.nnx")
    arrays = [nnx.Param(x) for x in to_jax(random_layer(rng, 2, 256, 64, gated=True))]
    with pytest.raises(TypeError, match=r"w13_weight: .*Param wrapper.*prepare\(\)"):
        jax_nvfp4.prepare_layer(*arrays)
    _assert_alive([p.get_value() for p in arrays])
