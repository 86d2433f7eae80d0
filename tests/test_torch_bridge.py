"""torch_bridge: zero-copy JAX <-> torch, refusals, and the eager swizzle (CPU; GPU in test_gpu_flashinfer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_bridge
from jax_nvfp4.layout import reference as _reference

pytestmark = pytest.mark.usefixtures("on_cpu")  # CPU arrays, also on a GPU machine


def test_to_torch_shares_memory(rng):
    x = jnp.asarray(rng.integers(0, 256, size=(3, 64, 16), dtype=np.uint8))
    t = torch_bridge.to_torch(x)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    assert t.dtype == torch.uint8 and tuple(t.shape) == x.shape
    np.testing.assert_array_equal(t.numpy(), np.asarray(x))


def test_float8_crosses_as_uint8_bytes(rng):
    b = rng.integers(0, 256, size=(2, 32, 8), dtype=np.uint8)
    x = jax.lax.bitcast_convert_type(jnp.asarray(b), jnp.float8_e4m3fn)
    t = torch_bridge.to_torch(x)
    assert t.dtype == torch.uint8 and t.data_ptr() == x.unsafe_buffer_pointer()
    np.testing.assert_array_equal(t.numpy(), b)


def test_from_torch_shares_memory(rng):
    # torch's own allocation (64-byte aligned; JAX on CPU needs that to share memory)
    t = torch.empty((4, 128, 32), dtype=torch.uint8)
    t.copy_(torch.from_numpy(rng.integers(0, 256, size=(4, 128, 32), dtype=np.uint8)))
    x = torch_bridge.from_torch(t)
    assert x.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(x), t.numpy())


def test_non_contiguous_tensor_needs_copy_true(rng):
    t = torch.from_numpy(rng.integers(0, 256, size=(64, 64), dtype=np.uint8))[:, :32]
    with pytest.raises(ValueError, match="not contiguous.*copy=True"):
        torch_bridge.from_torch(t)
    x = torch_bridge.from_torch(t, copy=True)
    np.testing.assert_array_equal(np.asarray(x), t.numpy())


def test_deleted_and_donated_arrays_are_refused(rng):
    x = jnp.asarray(rng.integers(0, 256, size=(2, 32, 8), dtype=np.uint8))
    x.delete()
    with pytest.raises(ValueError, match="deleted"):
        torch_bridge.to_torch(x)
    y = jnp.asarray(rng.integers(0, 256, size=(2, 32, 8), dtype=np.uint8))
    jax.jit(lambda a: a + 1, donate_argnums=0)(y)
    with pytest.raises(ValueError, match="donated"):
        torch_bridge.to_torch(y)
    with pytest.raises(ValueError, match="deleted"):
        torch_bridge.block_scale_interleave(y)


def test_float4_and_non_arrays_are_refused():
    if not hasattr(jnp, "float4_e2m1fn"):
        pytest.skip("no float4 in this jax")
    x = jnp.zeros((4, 8), jnp.float4_e2m1fn)
    with pytest.raises(TypeError, match="float4"):
        torch_bridge.to_torch(x)
    with pytest.raises(TypeError, match="jax.Array"):
        torch_bridge.to_torch(np.zeros(3))


def test_eager_swizzle_writes_into_the_jax_buffer(rng, stand_in_kernel):
    b = rng.integers(0, 256, size=(3, 200, 90), dtype=np.uint8)  # padded: 256 x 92
    out = jnp.asarray(rng.integers(0, 256, size=(5 * 256 * 92,), dtype=np.uint8))
    before = np.asarray(out).copy()
    ptr = out.unsafe_buffer_pointer()
    got = torch_bridge.block_scale_interleave(jnp.asarray(b), out=out, start=1)
    assert got is out and got.unsafe_buffer_pointer() == ptr
    per = 256 * 92
    flat = np.asarray(got)
    np.testing.assert_array_equal(flat[per:4 * per], _reference.swizzle(b))
    np.testing.assert_array_equal(flat[:per], before[:per])  # other experts untouched
    np.testing.assert_array_equal(flat[4 * per:], before[4 * per:])
    del flat, out  # (numpy's zero-copy view would hold the buffer too)
    # No torch view outlives the call: the buffer can be donated.
    jax.jit(lambda a: a + 1, donate_argnums=0)(got)
    assert got.is_deleted()


def test_out_too_small_is_refused(rng):
    b = jnp.asarray(rng.integers(0, 256, size=(2, 128, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="do not hold experts"):
        torch_bridge.block_scale_interleave(b, out=jnp.zeros((128 * 8 * 2,), jnp.uint8), start=1)
