"""kernel_scales: the TRT-LLM kernel's scalars, bit for bit against an independent numpy reference.

The reference rounds as vLLM 0.33 / sglang do: each product or quotient one float32
operation. Single operations are also checked through float64 and a cast: a product of
two float32 values is exact in float64, and a float64 quotient rounded again to float32
equals the float32 quotient (double rounding is harmless when 53 >= 2 * 24 + 2), so both
routes must give the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4.numerics.scales import KERNEL_NAMES

F32 = np.float32


def _scales(rng, e, *, gated=True, split=True):
    """Realistic ModelOpt scales: weight_scale_2 ~ amax_w / 2688, input_scale ~ amax_x / 2688."""
    cols = 2 if gated else 1
    s13 = rng.uniform(1e-5, 1e-2, (e, cols)).astype(F32)
    if not split:
        s13[:, 1:] = s13[:, :1]
    a13 = rng.uniform(1e-4, 1e-1, (e, cols)).astype(F32)
    return (s13 if gated else s13[:, 0], a13 if gated else a13[:, 0],
            rng.uniform(1e-5, 1e-2, e).astype(F32), rng.uniform(1e-4, 1e-1, e).astype(F32))


def _numpy_reference(s13, a13, s2, a2_in, gated):
    s13 = s13.reshape(len(s13), -1)
    s_gate, s_up = s13[:, 0], s13[:, -1]
    a1, a2 = F32(np.max(a13)), F32(np.max(a2_in))
    out1 = (a1 * s_up) * (F32(1) / a2) if gated else np.full(len(s13), F32(1) / a2, F32)
    return {"output1_scale_scalar": out1, "output1_scale_gate_scalar": a1 * s_gate,
            "output2_scale_scalar": a2 * s2, "hidden_states_global_scale": F32(1) / a1}


def _assert_bits(got: dict, want: dict):
    assert set(got) == set(KERNEL_NAMES) == set(want)
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, jax.Array) and g.dtype == np.float32, k
        assert g.shape == np.shape(w), (k, g.shape, np.shape(w))
        w = np.asarray(w, F32)
        assert np.asarray(g).tobytes() == w.tobytes(), (k, np.asarray(g), w)


@pytest.mark.parametrize("gated,split", [(True, True), (True, False), (False, False)])
def test_formulas_bit_exact(rng, gated, split):
    args = _scales(rng, 4096, gated=gated, split=split)  # many experts: a rewrite would show
    want = _numpy_reference(*args, gated)
    _assert_bits(jax_nvfp4.kernel_scales(*args, gated=gated), want)
    # single operations through float64 and back agree bit for bit (see the module docstring)
    s13, a13, s2, a2_in = (np.asarray(x, np.float64) for x in args)
    a1, a2 = a13.max(), a2_in.max()
    s_gate = s13.reshape(len(s13), -1)[:, 0]
    np.testing.assert_array_equal(want["output1_scale_gate_scalar"], (a1 * s_gate).astype(F32))
    np.testing.assert_array_equal(want["output2_scale_scalar"], (a2 * s2).astype(F32))
    assert want["hidden_states_global_scale"] == F32(1 / a1)
    if not gated:
        np.testing.assert_array_equal(want["output1_scale_scalar"], np.full(len(s2), F32(1 / a2)))


def test_gate_and_up_kept_apart(rng):
    s13, a13, s2, a2 = _scales(rng, 64, split=True)
    got = jax_nvfp4.kernel_scales(s13, a13, s2, a2)
    a1, inv_a2 = F32(a13.max()), F32(1) / F32(a2.max())
    np.testing.assert_array_equal(got["output1_scale_gate_scalar"], a1 * s13[:, 0])  # the gate's
    np.testing.assert_array_equal(got["output1_scale_scalar"], (a1 * s13[:, 1]) * inv_a2)  # up's
    # vLLM's shortcut (the gate's scale for both halves) gives other values here
    assert not np.array_equal(got["output1_scale_scalar"], (a1 * s13[:, 0]) * inv_a2)
    # a shared [E] scale is the same as two equal columns
    shared = jax_nvfp4.kernel_scales(s13[:, 0], a13, s2, a2)
    both = jax_nvfp4.kernel_scales(np.repeat(s13[:, :1], 2, 1), a13, s2, a2)
    _assert_bits(shared, {k: np.asarray(v) for k, v in both.items()})


def test_maxima_over_every_expert_and_column(rng):
    s13, a13, s2, a2 = _scales(rng, 8)
    a13[5, 1] = 0.5  # the up input scale of one expert is the largest
    a2[2] = 0.7
    got = jax_nvfp4.kernel_scales(s13, a13, s2, a2)
    assert got["hidden_states_global_scale"] == F32(1) / F32(0.5)
    np.testing.assert_array_equal(got["output2_scale_scalar"], F32(0.7) * s2)


def test_non_gated_accepts_a_column(rng):
    s13, a13, s2, a2 = _scales(rng, 16, gated=False)
    flat = jax_nvfp4.kernel_scales(s13, a13, s2, a2, gated=False)
    col = jax_nvfp4.kernel_scales(s13[:, None], a13[:, None], s2, a2, gated=False)
    _assert_bits(col, {k: np.asarray(v) for k, v in flat.items()})
    np.testing.assert_array_equal(flat["output1_scale_scalar"], np.full(16, F32(1) / a2.max()))


def test_jittable_and_the_same_bits(rng):
    args = _scales(rng, 256)
    eager = jax_nvfp4.kernel_scales(*args)
    jitted = jax.jit(jax_nvfp4.kernel_scales)(*(jnp.asarray(x) for x in args))
    _assert_bits(jitted, {k: np.asarray(v) for k, v in eager.items()})
    _assert_bits(eager, _numpy_reference(*args, True))
    f = jax.jit(lambda *a: jax_nvfp4.kernel_scales(*a, gated=False))
    non_gated = f(*_scales(rng, 8, gated=False))
    assert non_gated["output1_scale_scalar"].shape == (8,)


@pytest.mark.parametrize("gated,index,shape,pattern", [
    (True, 0, (4, 3), r"w13_weight_scale_2: expected shape \[E, 2\] or \[E\].*got \[4, 3\]"),
    (True, 0, (4, 2, 1), r"w13_weight_scale_2: expected shape .*got \[4, 2, 1\]"),
    (True, 1, (3, 2), r"w13_input_scale: expected shape \[4, 2\] or \[4\] \(E=4.*got \[3, 2\]"),
    (True, 2, (4, 1), r"w2_weight_scale_2: expected shape \[4\] .*got \[4, 1\]"),
    (True, 3, (5,), r"w2_input_scale: expected shape \[4\] .*got \[5\]"),
    (False, 0, (4, 2), r"w13_weight_scale_2: expected shape \[E\] or \[E, 1\].*gated=False"),
    (False, 1, (4, 2), r"w13_input_scale: expected shape \[4\] or \[4, 1\].*gated=False"),
])
def test_shapes_refused_naming_the_array(rng, gated, index, shape, pattern):
    args = list(_scales(rng, 4, gated=gated))
    args[index] = rng.uniform(0.1, 1, shape).astype(F32)
    with pytest.raises(ValueError, match=pattern):
        jax_nvfp4.kernel_scales(*args, gated=gated)


def test_dtypes_and_types_refused(rng):
    args = list(_scales(rng, 4))
    with pytest.raises(TypeError, match="w2_input_scale: expected float32, got float16"):
        jax_nvfp4.kernel_scales(*args[:3], args[3].astype(np.float16))
    with pytest.raises(TypeError, match="w13_input_scale: expected an array, got list"):
        jax_nvfp4.kernel_scales(args[0], [[1.0, 1.0]] * 4, *args[2:])
    with pytest.raises(TypeError, match="gated must be a bool"):
        jax_nvfp4.kernel_scales(*args, gated=1)


@pytest.mark.parametrize("bad", [0.0, -1e-3, np.nan, np.inf])
def test_broken_checkpoint_values_refused(rng, bad):
    args = list(_scales(rng, 6))
    args[1][4, 1] = bad  # expert 4's up input scale
    with pytest.raises(ValueError, match=r"w13_input_scale\[4, 1\] = .* not a positive finite "
                                         r"scale.*checkpoint is broken"):
        jax_nvfp4.kernel_scales(*args)
    args = list(_scales(rng, 6))
    args[2][0] = bad
    with pytest.raises(ValueError, match=r"w2_weight_scale_2\[0\]"):
        jax_nvfp4.kernel_scales(*(jnp.asarray(x) for x in args))  # concrete jax arrays too


def test_reciprocal_correctly_rounded(rng):
    # XLA on CUDA divides float32 approximately; kernel_scales' reciprocals must not
    # depend on it. Checked against numpy's IEEE division across the exponent range,
    # powers of two and their neighbours included.
    from jax_nvfp4.numerics.scales import reciprocal

    n = 100_000
    x = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-124, 125, n)).astype(F32)
    p2 = F32(2) ** np.arange(-124, 125).astype(F32)
    x = np.concatenate([x, p2, np.nextafter(p2, F32(np.inf)), np.nextafter(p2, F32(0))])
    got = np.asarray(jax.jit(reciprocal)(x))
    want = F32(1) / x
    assert got.dtype == np.float32
    bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, (x[bad[:5]], got[bad[:5]], want[bad[:5]])


def test_same_bits_as_vllm_and_sglang_in_torch(rng):
    # The peers' own arithmetic, transcribed in torch (CPU): vLLM 0.33 (modelopt.py
    # process_weights_after_loading: column 0 of w13_weight_scale_2; flashinfer_fp4_moe.py
    # amax of the input scales; trtllm_nvfp4_moe.py mul_ and _compute_g1_scale_c;
    # oracle/nvfp4.py a1_gscale = 1.0 / a13_scale) with equal gate/up scales, and sglang
    # (_compute_gemm1_alphas, _compute_g1_scale_c) with the up column kept apart.
    torch = pytest.importorskip("torch")
    e = 512
    s13, a13, s2, a2 = _scales(rng, e, split=False)
    t = {k: torch.from_numpy(v.copy()) for k, v in
         dict(s13=s13, a13=a13, s2=s2, a2=a2).items()}
    a13_v = t["a13"].max().to(torch.float32).repeat(e)
    a2_v = t["a2"].max().to(torch.float32).repeat(e)
    g1_alphas = t["s13"][:, 0].contiguous().mul_(a13_v)
    g2_alphas = t["s2"].clone().mul_(a2_v)
    vllm = {"output1_scale_gate_scalar": g1_alphas,
            "output1_scale_scalar": g1_alphas * (1.0 / a2_v),
            "output2_scale_scalar": g2_alphas,
            "hidden_states_global_scale": (1.0 / a13_v)[0]}
    _assert_bits(jax_nvfp4.kernel_scales(s13, a13, s2, a2),
                 {k: v.numpy() for k, v in vllm.items()})

    s13, a13, s2, a2 = _scales(rng, e, split=True)
    t13, ta13 = torch.from_numpy(s13), torch.from_numpy(a13)
    w13_in = ta13.max().to(torch.float32)
    w2_in = torch.from_numpy(a2).max().to(torch.float32)
    g1 = (w13_in * t13[:, 0]).to(torch.float32)
    g1_up = (w13_in * t13[:, 1]).to(torch.float32)
    w2_quant = (1 / w2_in).to(torch.float32)
    sglang = {"output1_scale_gate_scalar": g1,
              "output1_scale_scalar": (w2_quant * g1_up).to(torch.float32),
              "output2_scale_scalar": (w2_in * torch.from_numpy(s2)).to(torch.float32),
              "hidden_states_global_scale": (1 / w13_in).to(torch.float32)}
    _assert_bits(jax_nvfp4.kernel_scales(s13, a13, s2, a2),
                 {k: v.numpy() for k, v in sglang.items()})
