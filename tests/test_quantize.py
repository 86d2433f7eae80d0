"""quantize_nvfp4 against an independent numpy transcription of TensorRT-LLM's cvt_warp_fp16_to_fp4.

The reference below is written from the CUDA source (quantization_utils.cuh), not
from jax_nvfp4.numerics.quant: e4m3 and e2m1 rounding by nearest-value search over the
formats' tables (ties to the even code), subnormal flushing by the -ftz rule,
rcp.approx replaced by the correctly rounded reciprocal (what the module emulates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_nvfp4.numerics.quant import dequantize_nvfp4, quantize_nvfp4

F32 = np.float32
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)


def e4m3_table() -> np.ndarray:
    """All non-negative finite float8_e4m3fn values by code 0..126 (1.eee.mmm, bias 7)."""
    codes = np.arange(127)
    e, m = codes >> 3, codes & 7
    return np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))


E4M3 = e4m3_table()


def nearest_even(a: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table value to each ``a >= 0`` (ties: the even index), saturated."""
    a = np.minimum(a.astype(np.float64), table[-1])
    d = np.abs(a[..., None] - table)
    best = d.min(-1, keepdims=True)
    cand = d == best
    # among the (one or two) nearest, prefer an even index
    even = cand & (np.arange(len(table)) % 2 == 0)
    return np.where(even.any(-1), even.argmax(-1), cand.argmax(-1))


def ftz(v):
    v = np.asarray(v, F32)
    return np.where(np.abs(v) < F32(2.0 ** -126), np.copysign(F32(0), v), v).astype(F32)


def correct_rcp(v):
    with np.errstate(divide="ignore"):
        return (F32(1) / np.asarray(v, F32)).astype(F32)


def ref_quantize(x, g, *, fast_math=True, rcp=correct_rcp):
    """``x`` float32 [T, K] (values of the bf16 input), ``g`` float32 -> (packed uint8, scale bytes).

    ``rcp`` stands for the kernel's ``rcp.approx.ftz.f32`` (fast_math only); the GPU
    test passes the device's own instruction.
    """
    x = ftz(np.asarray(x, F32))
    t, k = x.shape
    g = ftz(F32(g))
    rcp6 = ftz(rcp(np.array([6.0], F32)))[0]
    rcp_g = ftz(rcp(np.array([g], F32)))[0]
    packed = np.zeros((t, k // 2), np.uint8)
    sf_bytes = np.zeros((t, k // 16), np.uint8)
    for b in range(k // 16):
        blk = x[:, 16 * b:16 * b + 16]
        vmax = ftz(np.nanmax(np.abs(blk), axis=1))
        if fast_math:
            sf = ftz(g * ftz(vmax * rcp6))
        else:
            sf = np.where(vmax != 0, ftz(vmax * ftz(g * (F32(1) / F32(6)))), F32(0))
        code = nearest_even(sf, E4M3).astype(np.uint8)
        dec = E4M3[code].astype(F32)
        with np.errstate(divide="ignore"):
            if fast_math:
                inv = ftz(dec * rcp_g)
                scale = np.where(code != 0, ftz(rcp(inv)), F32(0)).astype(F32)
            else:
                inv = ftz(dec * ftz(F32(1) / g))
                scale = np.where(vmax != 0, np.minimum(ftz(F32(1) / inv),
                                                       np.finfo(F32).max), F32(0)).astype(F32)
        y = ftz(blk * scale[:, None])
        mag = nearest_even(np.abs(y), E2M1).astype(np.uint8)
        nib = mag | (np.signbit(y).astype(np.uint8) << 3)
        nib = np.where(np.isnan(y), np.uint8(7), nib)  # the device's cvt gives +6 for NaN
        packed[:, 8 * b:8 * b + 8] = nib[:, 0::2] | (nib[:, 1::2] << 4)
        sf_bytes[:, b] = code
    return packed, sf_bytes


def bf16(a) -> np.ndarray:
    return np.asarray(a, F32).astype(ml_dtypes.bfloat16)


def check(x_bf16, g, **kw):
    got_p, got_s = jax.jit(lambda x, g: quantize_nvfp4(x, g, **kw))(jnp.asarray(x_bf16),
                                                                     jnp.float32(g))
    want_p, want_s = ref_quantize(np.asarray(x_bf16, F32), g, **kw)
    np.testing.assert_array_equal(np.asarray(got_s).view(np.uint8), want_s, "scale bytes")
    np.testing.assert_array_equal(np.asarray(got_p), want_p, "packed bytes")
    return got_p, got_s


@pytest.mark.parametrize("fast_math", [True, False])
@pytest.mark.parametrize("t, k", [(7, 64), (32, 256), (3, 2048)])
def test_random_bf16_matches_the_transcription(rng, t, k, fast_math):
    # Varying magnitudes per row (1e-3 .. 1e3) and a calibrated global scale, as fp4_quantize
    # is used for a layer's inputs (g = 448 * 6 / amax).
    x = bf16(rng.standard_normal((t, k)) * 10.0 ** rng.uniform(-3, 3, (t, 1)))
    g = F32(448 * 6) / np.abs(np.asarray(x, F32)).max()
    check(x, g, fast_math=fast_math)
    check(x, F32(rng.uniform(0.1, 1e4)), fast_math=fast_math)  # any scale: e4m3 saturates


@pytest.mark.parametrize("fast_math", [True, False])
def test_rounding_ties_go_to_even(fast_math):
    # With g = 1 and a block max of 6 * 2**k the block scale is exactly 2**k, so the other
    # values m * 2**k land exactly on e2m1 midpoints and must round to the even code.
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    want = np.array([0, 2, 2, 4, 4, 6, 6], np.uint8)  # codes of 0, 1, 1, 2, 2, 4, 4
    for k in (-3, 0, 4):
        row = np.concatenate([[6.0], mids, -mids, [0.0]]) * 2.0 ** k
        p, s = check(bf16(row[None]), F32(1), fast_math=fast_math)
        codes = np.stack([np.asarray(p) & 0xF, np.asarray(p) >> 4], -1).reshape(-1)
        np.testing.assert_array_equal(codes[1:8], want)
        np.testing.assert_array_equal(codes[8:15], want | 8)
        assert np.asarray(s).astype(np.float32)[0, 0] == 2.0 ** k


def test_zero_blocks_tiny_blocks_and_signed_zeros():
    x = np.zeros((4, 64), F32)
    x[1, :16] = -0.0                         # negative zeros keep their sign bit
    x[2, 16:32] = 1e-30                      # block scale rounds to e4m3 zero -> codes 0
    x[3, 32:48] = np.linspace(-1e-39, 1e-39, 16)  # float32 subnormals: flushed (-ftz)
    x[3, 48:64] = np.linspace(-3, 3, 16)     # an ordinary block beside them
    for fast_math in (True, False):
        p, s = check(bf16(x), F32(1), fast_math=fast_math)
        assert not np.asarray(s).astype(np.float32)[:3].any()
        assert np.asarray(s).astype(np.float32)[3, 3] > 0
    p = np.asarray(p)
    assert (p[0] == 0).all() and (p[1, :8] == 0x88).all()


def test_large_magnitudes_and_saturation(rng):
    # Scales above 448 saturate (e4m3 satfinite), and then values above 6 saturate too.
    x = bf16(rng.standard_normal((8, 128)) * 1e30)
    p, s = check(x, F32(1e-20))
    assert (np.asarray(s).astype(np.float32) == 448).all()
    mag = np.stack([np.asarray(p) & 7, (np.asarray(p) >> 4) & 7], -1)
    assert (mag == 7).mean() > 0.5
    x = bf16(np.full((2, 32), np.inf) * np.array([[1], [-1]]))  # infinities saturate to +-6
    p, s = check(x, F32(1))
    assert (np.asarray(p)[0] == 0x77).all() and (np.asarray(p)[1] == 0xFF).all()
    check(bf16(rng.standard_normal((4, 64)) * 1e-20), F32(1e25))  # tiny values, huge scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_input_dtypes_and_leading_dims(rng, dtype):
    x = jnp.asarray(rng.standard_normal((2, 3, 64)).astype(np.float32)).astype(dtype)
    p, s = quantize_nvfp4(x, 2.5)
    assert p.shape == (2, 3, 32) and p.dtype == jnp.uint8
    assert s.shape == (2, 3, 4) and s.dtype == jnp.float8_e4m3fn
    want_p, want_s = ref_quantize(np.asarray(x.astype(jnp.float32)).reshape(6, 64), F32(2.5))
    np.testing.assert_array_equal(np.asarray(p).reshape(6, 32), want_p)
    np.testing.assert_array_equal(np.asarray(s).view(np.uint8).reshape(6, 4), want_s)


def test_round_trip_error_is_bounded(rng):
    # Per block: e4m3 rounds the scale by at most 2**-4 relative, and e2m1 values are at
    # most half a step (1 at the top, between 4 and 6) from x * scale, so
    # |x - dequantized| <= (1 + 2**-4) * max|block| / 6 (plus the tiny float error).
    x = bf16(rng.standard_normal((16, 512)) * 10.0 ** rng.uniform(-2, 2, (16, 1)))
    xf = np.asarray(x, F32)
    g = F32(448 * 6) / np.abs(xf).max()
    p, s = quantize_nvfp4(jnp.asarray(x), g)
    d = np.asarray(dequantize_nvfp4(p, s, g))
    vmax = np.abs(xf).reshape(16, 32, 16).max(-1, keepdims=True)
    err = np.abs(d - xf).reshape(16, 32, 16)
    assert (err <= (1 + 2.0 ** -4) * vmax / 6 * (1 + 1e-5)).all()
    # and it is the quantizer's error, not zero: the check can fail
    assert err.max() > 0
    rel = np.linalg.norm(d - xf) / np.linalg.norm(xf)
    assert rel < 0.15, rel


def test_dequantize_is_the_inverse_on_codes(rng):
    p = rng.integers(0, 256, (5, 32), dtype=np.uint8)
    s = rng.integers(0, 0x7F, (5, 4), dtype=np.uint8)  # finite e4m3 bytes
    d = np.asarray(dequantize_nvfp4(p, s, 4.0))
    nib = np.stack([p & 0xF, p >> 4], -1).reshape(5, 64)
    vals = np.where(nib & 8, -1, 1) * E2M1[nib & 7]
    want = vals * np.repeat(s.view(ml_dtypes.float8_e4m3fn).astype(np.float64), 16, 1) / 4.0
    np.testing.assert_allclose(d, want, rtol=1e-6)


def test_a_wrong_quantizer_fails_the_check(rng):
    # The transcription is sensitive: a quantizer off by one ulp of the scale disagrees.
    x = bf16(rng.standard_normal((16, 256)))
    want_p, _ = ref_quantize(np.asarray(x, F32), F32(1))
    got_p, _ = quantize_nvfp4(jnp.asarray(x), F32(1) * F32(1 + 2.0 ** -7))
    assert (np.asarray(got_p) != want_p).any()


@pytest.mark.parametrize("t, k", [(9, 64), (130, 512)])
def test_exact_recipe_matches_flashinfers_own_reference(rng, t, k):
    # flashinfer ships a CPU reference of the kernel's correctly rounded recipe
    # (FLASHINFER_DISABLE_FP4_QUANT_FAST_MATH=1; batch_invariant/quantization/nvfp4_reference.py):
    # fast_math=False must give its bytes. (It does not flush subnormals: none here.)
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("flashinfer.batch_invariant.quantization.nvfp4_reference")
    x = rng.standard_normal((t, k)) * 10.0 ** rng.uniform(-3, 3, (t, 1))
    x[0, :16] = 0.0
    x[1, 3] = np.nan  # ignored by the block max, quantized to +6
    x = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    g = F32(448 * 6) / float(x.float().nan_to_num().abs().max())
    want_p, want_sf, _ = ref.quantize_reference(x, float(g))
    want_s = ref.unswizzle_sf_128x4(want_sf, t, k)
    p, s = quantize_nvfp4(jnp.asarray(x.float().numpy()).astype(jnp.bfloat16), g, fast_math=False)
    np.testing.assert_array_equal(np.asarray(s).view(np.uint8), want_s.numpy())
    np.testing.assert_array_equal(np.asarray(p), want_p.numpy())
    assert np.asarray(p)[1, 1] & 0xF0 == 0x70


def test_validation():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(jnp.zeros((2, 24)), 1.0)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        quantize_nvfp4(jnp.zeros((2, 32), jnp.int32), 1.0)
    with pytest.raises(ValueError, match="global_scale"):
        quantize_nvfp4(jnp.zeros((2, 32)), jnp.ones(2))
    with pytest.raises(TypeError, match="fast_math"):
        quantize_nvfp4(jnp.zeros((2, 32)), 1.0, fast_math=1)
    with pytest.raises(ValueError, match="scales"):
        dequantize_nvfp4(jnp.zeros((2, 16), jnp.uint8), jnp.zeros((2, 3), jnp.uint8), 1.0)
