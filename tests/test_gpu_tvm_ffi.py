"""flashinfer's block_scale_interleave as an XLA FFI call (jax-tvm-ffi) on a CUDA GPU:
bytes against flashinfer from torch and XLA's swizzle, in jit, in the donated buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
flashinfer = pytest.importorskip("flashinfer")
pytest.importorskip("jax_tvm_ffi")

import jax_nvfp4
import torch_bridge
from jax_nvfp4.backends import flashinfer as _flashinfer
from jax_nvfp4.layout import index as _layout, reference as _reference
from jax_nvfp4 import kernels
from helpers import assert_bytes_equal, assert_no_race, random_layer, to_jax

SHAPES = [(1, 128, 4), (3, 256, 8), (5, 384, 28), (2, 100, 6), (64, 4096, 448)]


def _torch_swizzle(b):
    t = torch.from_numpy(b).cuda()
    return flashinfer.block_scale_interleave(t).cpu().numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float8_e4m3fn])
def test_ffi_swizzle_is_flashinfers_bytes_in_jit(rng, shape, dtype):
    b = rng.integers(0, 256, size=shape, dtype=np.uint8)
    want = _torch_swizzle(b)
    if b.size < 1 << 22:  # the numpy reference's index arrays grow large
        np.testing.assert_array_equal(want, _reference.swizzle(b))
    s = jax.lax.bitcast_convert_type(jnp.asarray(b), dtype)
    got = jax.jit(kernels.block_scale_interleave)(s)
    assert got.dtype == dtype
    assert_bytes_equal(np.asarray(got).reshape(-1), want, "ffi new buffer")
    if shape[1] % 128 == 0 and shape[2] % 4 == 0:
        assert_bytes_equal(np.asarray(jax.jit(_layout.swizzle_scales)(s)).reshape(-1), want,
                           "xla swizzle")


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float8_e4m3fn])
def test_ffi_writes_into_the_donated_buffer(rng, dtype):
    b = rng.integers(0, 256, size=(16, 4096, 448), dtype=np.uint8)
    want = _torch_swizzle(b)
    s = jax.lax.bitcast_convert_type(jnp.asarray(b), dtype)
    f = jax.jit(lambda buf, x: kernels.block_scale_interleave(x, out=buf), donate_argnums=0)
    buf = jnp.asarray(rng.integers(0, 256, size=b.shape, dtype=np.uint8)).view(dtype)
    ptr = buf.unsafe_buffer_pointer()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated()
    got = jax.block_until_ready(f(buf, s))
    assert buf.is_deleted() and got.unsafe_buffer_pointer() == ptr
    assert torch.cuda.max_memory_allocated() == before  # torch allocated nothing
    assert_bytes_equal(np.asarray(got).reshape(-1), want, "ffi into donated")
    # The compiled program aliases the buffer: no copy of it, no second buffer.
    ma = f.lower(jnp.zeros(b.shape, dtype), s).compile().memory_analysis()
    assert ma.alias_size_in_bytes == b.size


def test_ffi_start_writes_only_its_experts(rng):
    b = rng.integers(0, 256, size=(3, 256, 8), dtype=np.uint8)
    want = _torch_swizzle(b)
    keep = rng.integers(0, 256, size=(7, 256, 8), dtype=np.uint8)
    f = jax.jit(lambda buf, x: kernels.block_scale_interleave(x, out=buf, start=2),
                donate_argnums=0)
    got = np.asarray(f(jnp.asarray(keep), jnp.asarray(b))).reshape(7, -1)
    np.testing.assert_array_equal(got[2:5].reshape(-1), want)
    np.testing.assert_array_equal(np.delete(got, [2, 3, 4], axis=0),
                                  np.delete(keep.reshape(7, -1), [2, 3, 4], axis=0))


def test_flashinfer_backend_uses_ffi_and_stays_in_place(rng):
    assert _flashinfer._via_ffi()
    host = random_layer(rng, 64, 2048, 256)
    want = _reference.prepare_layer(*host, gated=True)
    layer = to_jax(host)
    pointers = [x.unsafe_buffer_pointer() for x in layer]
    out = jax.block_until_ready(jax_nvfp4.prepare_layer(*layer, backend="flashinfer"))
    assert [x.unsafe_buffer_pointer() for x in out] == pointers
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), out, want):
        assert_bytes_equal(g, w, name)
    chunked = jax_nvfp4.prepare_layer(*to_jax(host), backend="flashinfer", chunk_bytes=1 << 20)
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), chunked, want):
        assert_bytes_equal(g, w, f"chunked {name}")


def test_ffi_route_has_no_race(rng):
    assert_no_race(rng, "flashinfer", rounds=100)


def test_buffer_callback_fallback_still_matches(rng, monkeypatch):
    from jax_nvfp4.kernels import _ffi
    monkeypatch.setattr(_ffi, "missing", lambda: "forced off")
    assert not _flashinfer._via_ffi()
    host = random_layer(rng, 8, 1024, 128)
    want = _reference.prepare_layer(*host, gated=True)
    out = jax_nvfp4.prepare_layer(*to_jax(host), backend="flashinfer")
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), out, want):
        assert_bytes_equal(g, w, name)


def test_fused_moe_refuses_this_gpu_naming_its_capability(rng):
    # trtllm-gen's FP4 MoE exists only on Blackwell (sm_100 / sm_103).
    cc = jax.devices()[0].compute_capability
    if cc in ("10.0", "10.3"):
        pytest.skip("a Blackwell GPU: the refusal does not apply")
    e, hp, ip = 2, 256, 128
    u8 = lambda *s: jnp.asarray(rng.integers(0, 256, s, dtype=np.uint8))  # noqa: E731
    f32 = lambda *s: jnp.asarray(rng.uniform(0.5, 2, s).astype(np.float32))  # noqa: E731
    layer = jax_nvfp4.PreparedLayer(dict(
        w13_weight=u8(e, 2 * ip, hp // 2), w13_weight_scale=u8(e, 2 * ip, hp // 16),
        w2_weight=u8(e, hp, ip // 2), w2_weight_scale=u8(e, hp, ip // 16),
        **jax_nvfp4.kernel_scales(f32(e, 2), f32(e, 2), f32(e), f32(e))))
    x = jnp.ones((3, hp), jnp.bfloat16)
    ids = jnp.zeros((3, 1), jnp.int32)
    with pytest.raises(RuntimeError, match=f"compute capability {cc}"):
        kernels.trtllm_fp4_moe(x, layer, ids, jnp.ones((3, 1), jnp.float32))
