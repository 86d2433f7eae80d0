"""NVFP4 quantization of activations, as flashinfer's ``fp4_quantize`` computes it.

``quantize_nvfp4(x, global_scale)`` transcribes TensorRT-LLM's
``cvt_warp_fp16_to_fp4`` (flashinfer ``csrc/nv_internal/tensorrt_llm/kernels/
quantization_utils.cuh``), the arithmetic of ``fp4_quantize(x, global_scale,
sf_vec_size=16, sf_use_ue8m0=False, is_sf_swizzled_layout=False)``, in plain
``jnp`` (jittable, any platform). Per block of 16 consecutive values of a row,
with ``g = global_scale``::

    vec_max  = max |x|                                  (NaNs ignored, as __hmax)
    sf       = g * (vec_max * rcp(6))                   -> e4m3, round to nearest even, saturated
    scale    = rcp(float(sf_e4m3) * rcp(g))             (0 where the e4m3 byte is 0)
    q        = e2m1(x * scale)                          round to nearest even, saturated to 6

``rcp`` is the kernel's ``rcp.approx.ftz.f32`` (the MUFU reciprocal, within one
ulp and not specified bit for bit by NVIDIA). XLA has no such instruction, so it
is emulated by the correctly rounded reciprocal ``1 / v``, computed exactly
(``_scales.reciprocal``: XLA on CUDA divides float32 approximately, which made
GPU and CPU results differ in 0.19% of packed bytes on an H200). Where the hardware's
approximation differs from the correctly rounded value by an ulp, ``x * scale``
moves by about an ulp, which changes a value only if it lies within an ulp or so of
an e2m1 rounding midpoint (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5); the block scale
itself can change only if ``vec_max / 6 * g`` lies within an ulp of an e4m3
midpoint. With ``fast_math=False`` the function is instead the kernel's other
recipe (``FLASHINFER_DISABLE_FP4_QUANT_FAST_MATH=1``), whose arithmetic is all
correctly rounded and is reproduced exactly::

    sf       = vec_max * (g * (1/6))                    (0 where vec_max is 0)
    scale    = min(1 / (float(sf_e4m3) * (1 / g)), FLT_MAX)   (0 where vec_max is 0)

Both recipes flush float32 subnormals to zero as the kernel (built with
``-use_fast_math``) does: inputs of magnitude below 2**-126 count as zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .scales import reciprocal

BLOCK = 16
E4M3_MAX = 448.0
E2M1_MAX = 6.0
# e2m1 magnitudes by code (bits 2..0); bit 3 is the sign.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
_TINY = np.float32(2.0 ** -126)  # smallest normal float32
_RCP6 = np.float32(1.0) / np.float32(6.0)  # rcp(6.0f), correctly rounded
_FLT_MAX = np.finfo(np.float32).max
_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _ftz(v):
    """Flush float32 subnormals to (signed) zero, as ``-ftz=true`` arithmetic does."""
    return jnp.where(jnp.abs(v) < _TINY, v * 0, v)


def _round_e4m3(v):
    """Non-negative float32 -> the nearest float8_e4m3fn value (ties to even), saturated at 448.

    Exact on every backend: the rounding is done in float32 on ``v / ulp``,
    a power-of-two scaling, then the value (already an e4m3 value) is converted.
    NaN stays NaN.
    """
    v = jnp.minimum(v, E4M3_MAX)  # satfinite (inf included); NaN propagates
    _, exp = jnp.frexp(v)  # v = m * 2**exp, m in [0.5, 1)
    # 3 mantissa bits: ulp = 2**(exp - 4) for normals (v >= 2**-6), 2**-9 below.
    ulp_exp = jnp.maximum(exp - 4, -9)
    q = jnp.ldexp(jnp.round(jnp.ldexp(v, -ulp_exp)), ulp_exp)
    return jnp.minimum(q, E4M3_MAX).astype(jnp.float8_e4m3fn)


def _e2m1_codes(y):
    """float32 -> e2m1 codes (uint8, 0..15): round to nearest even, saturated to +-6.

    The sign bit is the input's (a negative value that rounds to zero is ``0x8``);
    NaN gives +6 (``0x7``), as the device's ``cvt.rn.satfinite.e2m1x2.f32`` does.
    """
    a = jnp.abs(y)
    # Each threshold adds one code; at a midpoint the even code wins, so the
    # comparison is > below an even code's upper midpoint and >= below an odd one's.
    mag = ((a > 0.25).astype(jnp.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
           + (a > 2.5) + (a >= 3.5) + (a > 5.0)).astype(jnp.uint8)
    nan = jnp.isnan(y)
    sign = (jnp.signbit(y) & ~nan).astype(jnp.uint8) << 3
    return jnp.where(nan, jnp.uint8(7), mag) | sign


def _check(x, global_scale):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x: expected an array, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _INPUT_DTYPES]:
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {jnp.dtype(x.dtype).name}")
    if len(x.shape) < 1 or x.shape[-1] % BLOCK:
        raise ValueError(
            f"x: the last axis must be a multiple of {BLOCK} (one scale per {BLOCK} values), "
            f"got shape {tuple(x.shape)}"
        )
    shape = np.shape(global_scale)
    if int(np.prod(shape)) != 1 or len(shape) > 1:
        raise ValueError(f"global_scale: expected a scalar (shape () or (1,)), got shape {shape}")


def quantize_nvfp4(x, global_scale, *, fast_math: bool = True):
    """Quantize activations to NVFP4 exactly as flashinfer's ``fp4_quantize`` does.

    Parameters
    ----------
    x : array ``[..., K]``, bfloat16, float16 or float32
        ``K`` a multiple of 16. Each row is cut into blocks of 16 consecutive
        values, each with its own scale. float32 input is quantized by the same
        arithmetic (flashinfer takes only 16-bit input: cast first to match it).
    global_scale : float32 scalar (shape ``()`` or ``(1,)``), positive and finite
        The per-tensor *quantization* scale (flashinfer's ``global_scale``; for a
        ModelOpt layer's input, ``1 / input_scale``): values are stored as
        ``x * global_scale`` in units of the block scales.
    fast_math : bool, keyword-only
        True (flashinfer's default): the kernel's approximate-reciprocal recipe,
        with ``rcp.approx`` emulated by correctly rounded reciprocals (see the
        module docstring for what can differ). False: the recipe of
        ``FLASHINFER_DISABLE_FP4_QUANT_FAST_MATH=1``, reproduced exactly.

    Returns
    -------
    packed : uint8 ``[..., K/2]``
        Two e2m1 codes a byte, the low nibble the even element (flashinfer's
        ``x_q`` viewed as uint8).
    scales : float8_e4m3fn ``[..., K/16]``
        One block scale per 16 values, row-major (the linear layout,
        ``is_sf_swizzled_layout=False``). ``x ~= e2m1(packed) * scales / global_scale``.

    NaN inputs are ignored by the block maximum and quantize to +6 (code ``0x7``), as
    on the device (flashinfer's CPU reference of the kernel says so); infinities
    saturate to +-6. Jittable; ``global_scale`` may be traced.
    """
    _check(x, global_scale)
    if not isinstance(fast_math, bool):
        raise TypeError(f"fast_math must be a bool, got {fast_math!r}")
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    xf = _ftz(jnp.asarray(x).astype(jnp.float32)).reshape(*lead, k // BLOCK, BLOCK)
    g = _ftz(jnp.reshape(jnp.asarray(global_scale, dtype=jnp.float32), ()))
    vec_max = _ftz(jnp.nanmax(jnp.abs(xf), axis=-1))  # __hmax ignores NaN
    if fast_math:
        sf = _ftz(g * _ftz(vec_max * _RCP6))
        code = _round_e4m3(sf)
        decoded = code.astype(jnp.float32)
        inv = _ftz(decoded * _ftz(reciprocal(g)))
        scale = jnp.where(decoded != 0, _ftz(reciprocal(inv)), 0.0)
    else:
        nonzero = vec_max != 0
        sf = jnp.where(nonzero, _ftz(vec_max * _ftz(g * _RCP6)), 0.0)
        code = _round_e4m3(sf)
        inv = _ftz(code.astype(jnp.float32) * _ftz(reciprocal(g)))
        scale = jnp.where(nonzero, jnp.minimum(_ftz(reciprocal(inv)), _FLT_MAX), 0.0)
    y = _ftz(xf * scale[..., None]).reshape(*lead, k)
    codes = _e2m1_codes(y)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, code


def dequantize_nvfp4(packed, scales, global_scale):
    """The float32 values of NVFP4 activations: ``e2m1(packed) * scales / global_scale``.

    Parameters
    ----------
    packed : uint8 ``[..., K/2]``
        Low nibble the even element.
    scales : float8_e4m3fn (or its uint8 bytes) ``[..., K/16]``, linear layout.
    global_scale : float32 scalar
        The quantization scale ``packed``/``scales`` were made with (as
        :func:`quantize_nvfp4` takes it).

    Returns
    -------
    float32 ``[..., K]``
    """
    packed = jnp.asarray(packed)
    scales = jnp.asarray(scales)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed: expected uint8, got {packed.dtype.name}")
    if scales.dtype == jnp.uint8:
        scales = jax.lax.bitcast_convert_type(scales, jnp.float8_e4m3fn)
    if scales.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"scales: expected float8_e4m3fn or uint8, got {scales.dtype.name}")
    k = 2 * packed.shape[-1]
    if tuple(scales.shape) != (*packed.shape[:-1], k // BLOCK) or k % BLOCK:
        raise ValueError(
            f"scales: expected shape {[*packed.shape[:-1], k // BLOCK]} for packed of shape "
            f"{list(packed.shape)}, got {list(scales.shape)}"
        )
    lut = jnp.asarray(np.concatenate([E2M1_VALUES, -E2M1_VALUES]))
    values = lut[jnp.stack([packed & 0xF, packed >> 4], axis=-1)].reshape(*packed.shape[:-1], k)
    blocks = values.reshape(*packed.shape[:-1], k // BLOCK, BLOCK)
    g = jnp.reshape(jnp.asarray(global_scale, dtype=jnp.float32), ())
    return (blocks * (scales.astype(jnp.float32) / g)[..., None]).reshape(values.shape)
