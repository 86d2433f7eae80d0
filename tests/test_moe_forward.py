"""moe_forward: against an independent numpy forward, the same from either layout, and the
kernel's quantized arithmetic against the float forward (the check of the global scales).

Layers are random bytes with random *finite* e4m3 block scales (never NaN), random
per-expert weight_scale_2 that differ between gate and up, random routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
import moe_reference_numpy as ref
from helpers import random_layer, to_jax
from jax_nvfp4.layout.spec import NAMES


def finite_scale_bytes(rng, shape, lo=0x00):
    """Random finite, non-negative float8_e4m3fn bytes (0x7f is NaN: never drawn)."""
    return rng.integers(lo, 0x7F, size=shape, dtype=np.uint8)


def make_layer(rng, e, h, i, *, gated, tokens=8, lo=0x00):
    """(host arrays, checkpoint-layout mapping, x bf16 [T, H], topk_ids, topk_weights)."""
    w13, s13, w2, s2 = random_layer(rng, e, h, i, gated=gated)
    s13, s2 = finite_scale_bytes(rng, s13.shape, lo), finite_scale_bytes(rng, s2.shape, lo)
    host = [w13, s13, w2, s2]
    # weight_scale_2 near 1 / (600 sqrt(H)) keeps activations O(1); gate and up differ.
    s_w = 1.0 / (600.0 * np.sqrt(h))
    scalars = {
        "w13_weight_scale_2": rng.uniform(0.5, 2.0, (e, 2) if gated else (e,)).astype(np.float32)
        * np.float32(s_w),
        "w2_weight_scale_2": (rng.uniform(0.5, 2.0, e) * s_w).astype(np.float32),
    }
    layer = dict(zip(NAMES, to_jax(host)))
    layer.update((k, jnp.asarray(v)) for k, v in scalars.items())
    x = jnp.asarray(rng.standard_normal((tokens, h)).astype(np.float32)).astype(jnp.bfloat16)
    k = min(2, e)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(tokens)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
    return host, layer, x, jnp.asarray(ids), jnp.asarray(w / w.sum(1, keepdims=True))


def numpy_forward(host, layer, x, ids, w, *, gated):
    return ref.moe_forward(np.asarray(x.astype(jnp.float32)), *host,
                           np.asarray(layer["w13_weight_scale_2"]),
                           np.asarray(layer["w2_weight_scale_2"]), np.asarray(ids),
                           np.asarray(w), gated=gated)


def prepared(layer, *, gated, **kw):
    """The layer through jax_nvfp4.prepare (a PreparedLayer recording its sizes)."""
    return jax_nvfp4.prepare({"moe": layer}, gated=gated, donate=False, **kw)["moe"]


def act(gated):
    return "swiglu" if gated else "relu2"


def with_kernel_scalars(rng, layer, host, x, *, gated):
    """Add input scales calibrated on x and the layer (amax / (448 * 6), per expert a
    little lower, as calibration gives), and the kernel scalars kernel_scales makes."""
    e = host[0].shape[0]
    amax_x = float(np.abs(np.asarray(x.astype(jnp.float32))).max())
    amax_act = ref.intermediate_amax(np.asarray(x.astype(jnp.float32)), host[0], host[1],
                                     np.asarray(layer["w13_weight_scale_2"]), gated=gated)
    shape13 = (e, 2) if gated else (e,)
    a13 = (amax_x / 2688 * rng.uniform(0.7, 1.0, shape13)).astype(np.float32)
    a13.reshape(-1)[0] = amax_x / 2688  # the max is the calibrated one
    a2 = (amax_act / 2688 * rng.uniform(0.7, 1.0, e)).astype(np.float32)
    a2[0] = amax_act / 2688
    out = dict(layer, w13_input_scale=jnp.asarray(a13), w2_input_scale=jnp.asarray(a2))
    out.update(jax_nvfp4.kernel_scales(out["w13_weight_scale_2"], out["w13_input_scale"],
                                       out["w2_weight_scale_2"], out["w2_input_scale"],
                                       gated=gated))
    return out


# (E, H, I, gated): I padded (gated to 64, not gated to 128) or not; H padded to 256 or not.
CASES = [(4, 256, 64, True), (4, 256, 32, True), (3, 128, 128, False), (5, 256, 96, False),
         (4, 128, 64, True), (3, 384, 48, True), (2, 384, 128, False)]


@pytest.mark.parametrize("e, h, i, gated", CASES)
def test_matches_the_numpy_forward(rng, e, h, i, gated):
    host, layer, x, ids, w = make_layer(rng, e, h, i, gated=gated)
    got = np.asarray(jax_nvfp4.moe_forward(x, layer, ids, w, activation=act(gated)))
    want = numpy_forward(host, layer, x, ids, w, gated=gated)
    assert got.dtype == np.float32 and got.shape == (x.shape[0], h)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    # float32 (HIGHEST, f32 accumulation) vs float64: a few ulps of the output's scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("e, h, i, gated", CASES)
@pytest.mark.parametrize("quantize", [False, True])
def test_prepared_layout_gives_the_same_bits(rng, e, h, i, gated, quantize):
    host, layer, x, ids, w = make_layer(rng, e, h, i, gated=gated)
    if quantize:
        layer = with_kernel_scalars(rng, layer, host, x, gated=gated)
    p = prepared(layer, gated=gated)
    assert isinstance(p, jax_nvfp4.PreparedLayer)
    padded = p["w2_weight"].shape[1] != h or 2 * p["w2_weight"].shape[2] != i
    assert padded == (h % 256 != 0 or i % (64 if gated else 128) != 0)
    kw = dict(activation=act(gated), quantize_activations=quantize)
    want = np.asarray(jax_nvfp4.moe_forward(x, layer, ids, w, **kw))
    got = np.asarray(jax_nvfp4.moe_forward(x, p, ids, w, **kw))
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    # Same dequantized values, padding cropped before any sum: identical.
    np.testing.assert_array_equal(got, want)
    # Jitted, the PreparedLayer a pytree argument (its sizes are aux data): identical too.
    jitted = jax.jit(jax_nvfp4.moe_forward, static_argnames=("activation",
                                                              "quantize_activations"))
    np.testing.assert_array_equal(np.asarray(jitted(x, p, ids, w, **kw)), want)


def test_prepared_layer_without_its_sizes_is_equal_within_float_rounding(rng):
    host, layer, x, ids, w = make_layer(rng, 4, 128, 32, gated=True)
    p = jax_nvfp4.PreparedLayer(dict(prepared(layer, gated=True)))  # sizes unknown
    assert p.hidden_size is None
    got = np.asarray(jax_nvfp4.moe_forward(x, p, ids, w))  # H from x; padded I kept (zeros)
    want = np.asarray(jax_nvfp4.moe_forward(x, layer, ids, w))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_a_corrupted_layer_gives_another_output(rng):
    host, layer, x, ids, w = make_layer(rng, 4, 256, 64, gated=True)
    e = int(np.asarray(ids)[0, 0])
    s2 = host[3].copy()
    s2[e, 3, 0] = 0x40  # a normal block scale (2.0) where the byte below is corrupted
    layer = dict(layer, w2_weight_scale=to_jax([host[0], host[1], host[2], s2])[3])
    want = np.asarray(jax_nvfp4.moe_forward(x, layer, ids, w))
    # one weight byte of a routed expert
    w2 = np.asarray(layer["w2_weight"]).copy()
    w2[e, 3, 5] ^= 0x77
    bad = dict(layer, w2_weight=jnp.asarray(w2))
    assert not np.allclose(np.asarray(jax_nvfp4.moe_forward(x, bad, ids, w)), want)
    # gate and up weight_scale_2 swapped (vLLM's one-scale shortcut is the same kind of error)
    bad = dict(layer, w13_weight_scale_2=layer["w13_weight_scale_2"][:, ::-1])
    assert not np.allclose(np.asarray(jax_nvfp4.moe_forward(x, bad, ids, w)), want, rtol=1e-3)
    # prepared bytes read as the checkpoint layout
    p = prepared(layer, gated=True)
    # unmarked copies (without the marker leaf, which would say "prepared")
    plain = {k: jnp.array(v, copy=True) for k, v in p.items() if k != "nvfp4_layout"}
    assert not np.allclose(np.asarray(jax_nvfp4.moe_forward(x, plain, ids, w)), want)


def relative_error(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def fraction_close(got, want, *, atol, rtol):
    return float((np.abs(got - want) <= atol + rtol * np.abs(want)).mean())


# FP4 tolerance: NVFP4 rounds each value to 1 of 8 magnitudes of its block scale, a
# relative RMS error of ~7-9% for Gaussian blocks (test_quantize measures the bound).
# The forward quantizes x and then the activation, and sums 2 x H / I such errors per
# output: independent errors add in quadrature, so the output's relative (Frobenius)
# error is ~sqrt(2) x 9% ~ 13%; 0.25 leaves margin for outliers of small random
# layers. A wrong global scale is off by a factor (>= 25% for every scale tested below),
# far outside. flashinfer's own MoE test (atol=0.1, rtol=0.85, >= 92% close) is checked
# too, with atol scaled to the output's RMS (its outputs are O(1)).
FP4_RTOL = 0.25


@pytest.mark.parametrize("e, h, i, gated", [(4, 256, 128, True), (4, 512, 64, True),
                                            (3, 256, 128, False), (4, 384, 96, False)])
def test_quantized_forward_agrees_with_float_within_fp4_tolerance(rng, e, h, i, gated):
    host, layer, x, ids, w = make_layer(rng, e, h, i, gated=gated, tokens=32, lo=0x30)
    layer = with_kernel_scalars(rng, layer, host, x, gated=gated)
    kw = dict(activation=act(gated))
    want = np.asarray(jax_nvfp4.moe_forward(x, layer, ids, w, **kw))
    got = np.asarray(jax_nvfp4.moe_forward(x, layer, ids, w, quantize_activations=True, **kw))
    # The emulation is what its docstring says: an independent numpy transcription
    # (float64 sums; a rare e2m1 code may flip at a rounding midpoint, hence 1e-3).
    kernel = {n: layer[n] for n in ("output1_scale_scalar", "output1_scale_gate_scalar",
                                    "output2_scale_scalar", "hidden_states_global_scale")}
    numpy_q = ref.moe_forward_quantized(np.asarray(x.astype(jnp.float32)), *host, kernel,
                                        np.asarray(ids), np.asarray(w), gated=gated)
    print(f"vs numpy emulation {relative_error(got, numpy_q):.2e}")
    assert relative_error(got, numpy_q) < 1e-3, relative_error(got, numpy_q)
    err = relative_error(got, want)
    rms = float(np.sqrt(np.mean(want ** 2)))
    close = fraction_close(got, want, atol=0.1 * rms, rtol=0.85)
    print(f"relative error {err:.3f}, flashinfer-close {close:.3f}")
    assert err < FP4_RTOL and close >= 0.92, (err, close)
    assert err > 1e-3  # it is quantized: not the float forward

    # The check of the scalars can fail: each wrong in a way a converter could get wrong.
    s13 = np.asarray(layer["w13_weight_scale_2"]).reshape(e, -1)
    wrong = {
        # the input scale's inverse not taken (a1 for 1/a1): scales by a1**2
        "hidden_states_global_scale": 1 / layer["hidden_states_global_scale"],
        # GEMM2's input scale left out of output2_scale_scalar
        "output2_scale_scalar": jnp.asarray(np.asarray(layer["w2_weight_scale_2"])),
    }
    if gated and np.abs(s13[:, 0] / s13[:, 1] - 1).min() > 0.25:
        # vLLM's shortcut: the gate's weight_scale_2 for the up projection too
        wrong["output1_scale_scalar"] = (layer["output1_scale_scalar"] * s13[:, 0] / s13[:, 1])
    for name, value in wrong.items():
        bad = dict(layer, **{name: jnp.asarray(value, jnp.float32)})
        got_bad = np.asarray(jax_nvfp4.moe_forward(x, bad, ids, w, quantize_activations=True,
                                                   **kw))
        assert relative_error(got_bad, want) > FP4_RTOL, name


def test_memory_is_one_expert_not_the_layer(rng):
    # The compiled program's temporaries stay far below the layer's float32 size.
    e, h, i = 16, 512, 256
    host, layer, x, ids, w = make_layer(rng, e, h, i, gated=True, tokens=4)
    fn = jax.jit(jax_nvfp4.moe_forward)
    stats = fn.lower(x, layer, ids, w).compile().memory_analysis()
    if stats is None:
        pytest.skip("no memory analysis on this backend")
    layer_f32 = 4 * e * 3 * h * i
    expert_f32 = layer_f32 // e
    print(f"temp {stats.temp_size_in_bytes} B, one expert {expert_f32} B, layer {layer_f32} B")
    assert stats.temp_size_in_bytes < layer_f32 / 4


def test_validation(rng):
    host, layer, x, ids, w = make_layer(rng, 4, 256, 64, gated=True)
    f = jax_nvfp4.moe_forward
    with pytest.raises(ValueError, match=r"missing \['w2_weight_scale_2'\]"):
        f(x, {k: v for k, v in layer.items() if k != "w2_weight_scale_2"}, ids, w)
    with pytest.raises(ValueError, match="output1_scale_scalar.*kernel_scales"):
        f(x, layer, ids, w, quantize_activations=True)
    with pytest.raises(ValueError, match="activation='swiglu' needs a gated layer.*use activation='relu2'"):
        f(x, dict(layer, w13_weight=layer["w13_weight"][:, :64],
                  w13_weight_scale=layer["w13_weight_scale"][:, :64]), ids, w)
    with pytest.raises(ValueError, match="activation='relu2' needs a non-gated layer.*use activation='swiglu'"):
        f(x, layer, ids, w, activation="relu2")
    with pytest.raises(ValueError, match="activation must be one of"):
        f(x, layer, ids, w, activation="gelu")
    with pytest.raises(ValueError, match=r"x: expected \[T, 256\]"):
        f(x[:, :128], layer, ids, w)
    with pytest.raises(ValueError, match="topk_ids: expected \\[T, k\\] with T = 8"):
        f(x, layer, ids[:3], w)
    with pytest.raises(ValueError, match="topk_weights: expected the shape"):
        f(x, layer, ids, w[:, :1])
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        f(x, layer, ids.at[0, 0].set(4), w)
    with pytest.raises(TypeError, match="topk_ids: expected an integer"):
        f(x, layer, w, w)
    with pytest.raises(ValueError, match="w13_weight_scale_2.*expected shape"):
        f(x, dict(layer, w13_weight_scale_2=jnp.ones((4, 3))), ids, w)
    with pytest.raises(TypeError, match="layer: expected a mapping"):
        f(x, list(layer.values()), ids, w)
    p = prepared(layer, gated=True)
    with pytest.raises(ValueError, match="hidden_size"):
        f(x[:, :128], p, ids, w)


def test_scale_bytes_as_uint8_or_float8_give_the_same(rng):
    host, layer, x, ids, w = make_layer(rng, 3, 256, 64, gated=True)
    as_u8 = dict(layer, w13_weight_scale=jnp.asarray(host[1]),
                 w2_weight_scale=jnp.asarray(host[3]))
    np.testing.assert_array_equal(np.asarray(jax_nvfp4.moe_forward(x, as_u8, ids, w)),
                                  np.asarray(jax_nvfp4.moe_forward(x, layer, ids, w)))


def test_a_loaded_checkpoint_prepared_or_not_gives_the_same_forward(rng, tmp_path):
    # End to end: a synthetic ModelOpt checkpoint (H = 128 and I = 32 are padded by prepare),
    # gate and up weight_scale_2 different, loaded both ways.
    from jax_nvfp4.testing import write_checkpoint

    write_checkpoint(tmp_path, layers=1, experts=4, hidden=128, intermediate=32,
                     split_gate_up=True, seed=int(rng.integers(1 << 31)))
    plain = jax_nvfp4.load(tmp_path, prepare=False)["model"]["layers"]["0"]["mlp"]["experts"]
    prep = jax_nvfp4.load(tmp_path, prepare=True)["model"]["layers"]["0"]["mlp"]["experts"]
    assert isinstance(prep, jax_nvfp4.PreparedLayer) and prep["w2_weight"].shape[1] == 256
    x = jnp.asarray(rng.standard_normal((6, 128)).astype(np.float32)).astype(jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.permutation(4)[:2] for _ in range(6)]).astype(np.int32))
    w = jnp.asarray(rng.uniform(0.1, 1, (6, 2)).astype(np.float32))
    for quantize in (False, True):
        want = np.asarray(jax_nvfp4.moe_forward(x, plain, ids, w, quantize_activations=quantize))
        got = np.asarray(jax_nvfp4.moe_forward(x, prep, ids, w, quantize_activations=quantize))
        assert np.isfinite(want).all() and np.abs(want).max() > 0
        np.testing.assert_array_equal(got, want)
    host = [np.asarray(plain[n]).view(np.uint8) for n in NAMES]
    got = np.asarray(jax_nvfp4.moe_forward(x, plain, ids, w))
    want = numpy_forward(host, plain, x, ids, w, gated=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
