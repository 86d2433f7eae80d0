"""An independent numpy MoE forward of an NVFP4 layer in the checkpoint layout (float64).

Written apart from jax_nvfp4: its own e2m1 table and float8_e4m3fn decoding (from
the bit fields), a dense loop over tokens and their experts. Slow and plain on purpose.
"""

from __future__ import annotations

import numpy as np

# e2m1 code -> value: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0.
_E2M1 = np.array([(-1.0 if c & 8 else 1.0) * (
    (c & 1) * 0.5 if (c >> 1) & 3 == 0 else (1 + (c & 1) / 2) * 2.0 ** (((c >> 1) & 3) - 1))
    for c in range(16)])


def e4m3(byte: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes -> float64: sign, 4 exponent bits (bias 7), 3 mantissa bits; 0x7f/0xff NaN."""
    b = np.asarray(byte).astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    return np.where((b & 0x7F) == 0x7F, np.nan, sign * val)


def dequantize(packed: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    """One matrix: uint8 ``[R, K/2]`` (low nibble = column 2j) and scale bytes ``[R, K/16]``."""
    r, half = packed.shape
    out = np.empty((r, 2 * half))
    out[:, 0::2] = _E2M1[packed & 0xF]
    out[:, 1::2] = _E2M1[packed >> 4]
    return out * np.repeat(e4m3(scale_bytes), 16, axis=1)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def moe_forward(x, w13, s13, w2, s2, w13_scale_2, w2_scale_2, topk_ids, topk_weights, *,
                gated: bool):
    """``out[t] = sum_j w[t, j] * W2_e (act(W13_e x[t]))``, float64 ``[T, H]``.

    ``w13`` ``[E, R1, H/2]`` rows ``[up; gate]`` (gated, ``R1 = 2I``) or up only;
    ``w13_scale_2`` ``[E, 2]`` (gate, up) or ``[E]``; ``w2_scale_2`` ``[E]``.
    Scale arrays as uint8 bytes.
    """
    x = np.asarray(x, np.float64)
    w13_scale_2 = np.asarray(w13_scale_2, np.float64)
    if w13_scale_2.ndim == 1:
        w13_scale_2 = np.stack([w13_scale_2, w13_scale_2], axis=1)
    t_count, h = x.shape
    out = np.zeros((t_count, h))
    cache = {}
    for t in range(t_count):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e not in cache:
                cache[e] = (dequantize(w13[e], s13[e]), dequantize(w2[e], s2[e]))
            a, b = cache[e]
            i = b.shape[1]
            if gated:
                up = (a[:i] @ x[t]) * w13_scale_2[e, 1]
                gate = (a[i:] @ x[t]) * w13_scale_2[e, 0]
                act = _silu(gate) * up
            else:
                up = (a @ x[t]) * w13_scale_2[e, -1]
                act = np.maximum(up, 0.0) ** 2
            out[t] += float(topk_weights[t, j]) * (b @ act) * float(w2_scale_2[e])
    return out


def intermediate_amax(x, w13, s13, w13_scale_2, *, gated: bool) -> float:
    """max |act| over every token and expert: to calibrate the w2 input scale of a test layer."""
    x = np.asarray(x, np.float64)
    w13_scale_2 = np.asarray(w13_scale_2, np.float64)
    if w13_scale_2.ndim == 1:
        w13_scale_2 = np.stack([w13_scale_2, w13_scale_2], axis=1)
    amax = 0.0
    for e in range(w13.shape[0]):
        a = dequantize(w13[e], s13[e])
        if gated:
            i = a.shape[0] // 2
            act = _silu((x @ a[i:].T) * w13_scale_2[e, 0]) * (x @ a[:i].T) * w13_scale_2[e, 1]
        else:
            act = np.maximum((x @ a.T) * w13_scale_2[e, -1], 0.0) ** 2
        amax = max(amax, float(np.abs(act).max()))
    return amax


def _fake_quantize(v: np.ndarray, global_scale: float) -> np.ndarray:
    """NVFP4 quantize-dequantize (x ~ e2m1 * block scale / global scale), via the numpy
    transcription of the CUDA quantizer in test_quantize (also independent of jax_nvfp4)."""
    from test_quantize import ref_quantize

    packed, sf = ref_quantize(np.asarray(v, np.float32), np.float32(global_scale))
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(v.shape)
    return _E2M1[codes] * np.repeat(e4m3(sf), 16, axis=1) / float(np.float32(global_scale))


def moe_forward_quantized(x, w13, s13, w2, s2, kernel, topk_ids, topk_weights, *, gated: bool):
    """The kernel's arithmetic with its scalars (``kernel``: the four arrays of kernel_scales).

    x quantized with ``hidden_states_global_scale`` (kept in units of the block scales),
    GEMM1 on e2m1 x block-scale values, gate half x ``output1_scale_gate_scalar``, up half x
    ``output1_scale_scalar`` (not gated: ``relu(acc * gate scalar)**2 * output1 scalar``),
    the activation quantized with global scale 1, GEMM2 x ``output2_scale_scalar``.
    """
    g1 = float(np.asarray(kernel["hidden_states_global_scale"]).reshape(()))
    xq = _fake_quantize(x, g1) * g1  # e2m1 * block scale: units of 1 / g1
    o1, og, o2 = (np.asarray(kernel[n], np.float64) for n in (
        "output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar"))
    out = np.zeros((x.shape[0], x.shape[1]))
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            a, b = dequantize(w13[e], s13[e]), dequantize(w2[e], s2[e])
            i = b.shape[1]
            if gated:
                act = _silu((a[i:] @ xq[t]) * og[e]) * (a[:i] @ xq[t]) * o1[e]
            else:
                act = np.maximum((a @ xq[t]) * og[e], 0.0) ** 2 * o1[e]
            act = _fake_quantize(act[None].astype(np.float32), 1.0)[0]
            out[t] += float(topk_weights[t, j]) * (b @ act) * o2[e]
    return out
