"""Checkpoint families: Nemotron-H (non-gated ReLU^2), MiniMax-M2, Gemma-4, fused gate_up_proj
(per expert and stacked), MIXED_PRECISION; detected, loaded bit-exact, converted, inspected."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4 import cli as _cli
from jax_nvfp4.checkpoint import inspect as _inspect
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.checkpoint.read import CheckpointError, open_checkpoint
from jax_nvfp4.layout.spec import NAMES
from jax_nvfp4.testing import write_checkpoint
from ckpt_helpers import (GATED, KERNEL, assert_kernel_scalars, experts_of, kernel_reference,
                          prefix, rewrite, scalars, stacked)
from helpers import assert_bytes_equal, to_jax

SCALES = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")
# family -> (naming detected, config model_type)
FAMILIES = {"nemotron_h": ("nemotron_h", "nemotron_h"), "minimax_m2": ("mixtral", "minimax_m2"),
            "gemma4": ("qwen3", "gemma4"), "gate_up": ("gate_up", "qwen3_moe"),
            "gate_up_stacked": ("gate_up_stacked", "qwen3_moe")}


def _seed(rng):
    return int(rng.integers(2**31))


def _flat(params):
    return {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_detected_and_loaded_bit_exact(tmp_path, rng, family):
    e, layers = 3, 2
    tensors = write_checkpoint(tmp_path, naming=family, layers=layers, experts=e, hidden=256,
                               intermediate=64, seed=_seed(rng))
    gated = GATED[family]
    with open_checkpoint(tmp_path) as ckpt:
        assert (ckpt.naming, ckpt.family) == FAMILIES[family]
        assert [x.prefix for x in ckpt.moe] == [prefix(family, k) for k in range(layers)]
        assert all(x.gated == gated and x.spec.experts == e for x in ckpt.moe)
    raw = jax_nvfp4.load(tmp_path, prepare=False)
    params = jax_nvfp4.load(tmp_path)
    for layer in range(layers):
        host = stacked(tensors, family, layer, e)  # from the raw tensors, apart from the loader
        moe = experts_of(raw, family, layer)
        assert type(moe) is dict
        for name, x in zip(NAMES, host):
            assert_bytes_equal(moe[name], x, name)  # checkpoint layout: w13 rows [up; gate]
        for name, w in scalars(tensors, family, layer, e).items():
            assert moe[name].dtype == np.float32 and moe[name].shape == w.shape, name
            np.testing.assert_array_equal(np.asarray(moe[name]), w, err_msg=name)
        want = kernel_reference(tensors, family, layer, e)
        assert_kernel_scalars(moe, want)
        # the library's own kernel_scales on load's scalars, gated as the layer is
        ks = jax_nvfp4.kernel_scales(*(moe[n] for n in SCALES), gated=gated)
        assert_kernel_scalars(ks, want)
        prep = experts_of(params, family, layer)
        assert isinstance(prep, jax_nvfp4.PreparedLayer)
        assert (prep.hidden_size, prep.intermediate_size) == (256, 64)
        ref = _reference.prepare_layer(*host, gated=gated)
        for name, w, r in zip(NAMES, jax_nvfp4.prepare_layer(*to_jax(host), gated=gated), ref):
            assert_bytes_equal(prep[name], w, name)
            assert_bytes_equal(prep[name], r, name)
        assert_kernel_scalars(prep, want)
        assert set(prep) == set(NAMES) | set(SCALES) | set(KERNEL) | {"nvfp4_layout"}
    # everything else passes through, byte for byte (routers, norms, dense MLP, ...)
    flat = _flat(params)
    for name, x in tensors.items():
        if not name.startswith(tuple(prefix(family, k) + "." for k in range(layers))):
            assert np.asarray(flat[name]).tobytes() == x.tobytes() and \
                flat[name].dtype == x.dtype, name


@pytest.mark.parametrize("family", ["gate_up", "gate_up_stacked"])
def test_fused_gate_up_is_reordered(tmp_path, rng, family):
    # Fused tensors hold [gate; up] (HF/vLLM); the kernel's w13 is [up; gate]: the raw
    # order must not come through (so the byte comparison above can fail).
    tensors = write_checkpoint(tmp_path, naming=family, layers=1, experts=2, seed=_seed(rng))
    w13 = np.asarray(experts_of(jax_nvfp4.load(tmp_path, prepare=False), family, 0)["w13_weight"])
    p = prefix(family, 0)
    raw = (tensors[f"{p}.gate_up_proj"] if family == "gate_up_stacked" else
           np.stack([tensors[f"{p}.{e}.gate_up_proj.weight"] for e in range(2)]))
    assert w13.shape == raw.shape and not np.array_equal(w13, raw)
    np.testing.assert_array_equal(w13[:, :64], raw[:, 64:])  # up first
    np.testing.assert_array_equal(w13[:, 64:], raw[:, :64])


def test_nemotron_3_nano_sizes(tmp_path, rng):
    # Nemotron-3-Nano-30B-A3B: H = 2688 (padded to 2816 by hidden_alignment=256),
    # I = 1856 (non-gated: padded to a multiple of 128, 1920); w13 is up alone.
    e, h, i = 2, 2688, 1856
    tensors = write_checkpoint(tmp_path, naming="nemotron_h", layers=1, experts=e, hidden=h,
                               intermediate=i, shards=2, seed=_seed(rng))
    moe = experts_of(jax_nvfp4.load(tmp_path), "nemotron_h", 0)
    assert moe["w13_weight"].shape == (e, 1920, 2816 // 2)
    assert moe["w13_weight_scale"].shape == (e, 1920, 2816 // 16)
    assert moe["w2_weight"].shape == (e, 2816, 1920 // 2)
    assert (moe.hidden_size, moe.intermediate_size) == (h, i)
    host = stacked(tensors, "nemotron_h", 0, e)
    for name, w in zip(NAMES, jax_nvfp4.prepare_layer(*to_jax(host), gated=False)):
        assert_bytes_equal(moe[name], w, name)
    assert moe["w13_weight_scale_2"].shape == (e,)
    assert_kernel_scalars(moe, kernel_reference(tensors, "nemotron_h", 0, e))
    # ReLU^2: output1_scale_scalar is 1 / a2 for every expert; the gated formula differs
    a2 = np.float32(np.max(np.asarray(moe["w2_input_scale"])))
    np.testing.assert_array_equal(np.asarray(moe["output1_scale_scalar"]),
                                  np.full(e, np.float32(1) / a2))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_convert_then_load(tmp_path, rng, family):
    src, dst = tmp_path / "src", tmp_path / "dst"
    e = 2
    write_checkpoint(src, naming=family, layers=2, experts=e, hidden=384, intermediate=96,
                     seed=_seed(rng))
    want = jax_nvfp4.load(src)
    assert _cli.main(["convert", "--quiet", str(src), str(dst)]) == 0
    meta = json.loads((dst / "jax_nvfp4.json").read_text())
    assert meta["naming"] == FAMILIES[family][0] and meta["gated"] is GATED[family]
    got = jax_nvfp4.load(dst, prepare=False)
    for layer in range(2):
        a, b = experts_of(got, family, layer), experts_of(want, family, layer)
        assert isinstance(a, jax_nvfp4.PreparedLayer) and jax_nvfp4.is_prepared(a)
        assert (a.hidden_size, a.intermediate_size) == (384, 96)
        assert set(a) == set(b)
        for name in b:
            assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
            assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name
    with open_checkpoint(dst) as ckpt:
        assert all(x.gated == GATED[family] for x in ckpt.moe)
        assert ckpt.family == FAMILIES[family][1]  # config.json travels with the conversion


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inspect_shows_family_and_gating(tmp_path, rng, family):
    write_checkpoint(tmp_path, naming=family, layers=2, experts=3, seed=_seed(rng))
    text = _inspect.describe(tmp_path)
    label = {"nemotron_h": "Nemotron-H", "minimax_m2": "MiniMax-M2", "gemma4": "Gemma-4",
             "gate_up": "Qwen3-MoE", "gate_up_stacked": "Qwen3-MoE"}[family]
    field = {"nemotron_h": "n_routed_experts", "minimax_m2": "num_local_experts",
             "gemma4": "text_config.num_experts"}.get(family, "num_experts")
    act = {"nemotron_h": "relu2 (mlp_hidden_act)",
           "gemma4": "gelu_pytorch_tanh (hidden_activation)"}.get(family, "silu (hidden_act)")
    assert (f"family: {label} (model_type '{FAMILIES[family][1]}'), config {field} = 3, "
            f"activation {act}") in text, text
    assert f"naming: {FAMILIES[family][0]}" in text
    gating = ("not gated (ReLU^2: w13 = up only)" if family == "nemotron_h"
              else "gated (w13 = [up; gate])")
    assert f"layers 0-1: experts E=3, hidden H=256, intermediate I=64" in text
    assert gating in text, text


# -- MIXED_PRECISION ------------------------------------------------------------------------


def test_mixed_precision_experts_nvfp4_others_pass_through(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, layers=2, experts=2, quant_algo="MIXED_PRECISION",
                               seed=_seed(rng))
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["quantized_layers"]["model.layers.0.self_attn.q_proj"] == {"quant_algo": "FP8"}
    assert q["quantized_layers"]["model.layers.1.mlp.experts.1.down_proj"]["quant_algo"] == "NVFP4"
    params = jax_nvfp4.load(tmp_path)
    flat = _flat(params)
    fp8 = "model.layers.1.self_attn.o_proj.weight"
    assert flat[fp8].dtype == jax.numpy.float8_e4m3fn  # FP8 modules unchanged
    for name, x in tensors.items():
        if ".experts." not in name:
            assert np.asarray(flat[name]).tobytes() == x.tobytes(), name
    host = stacked(tensors, "qwen3", 1, 2)
    for name, w in zip(NAMES, _reference.prepare_layer(*host)):
        assert_bytes_equal(experts_of(params, "qwen3", 1)[name], w, name)
    assert "MIXED_PRECISION" in _inspect.describe(tmp_path)


def _edit_table(path, edit):
    for file, key in (("config.json", "quantization_config"), ("hf_quant_config.json",
                                                                "quantization")):
        d = json.loads((path / file).read_text())
        edit(d[key]["quantized_layers"])
        (path / file).write_text(json.dumps(d))


@pytest.mark.parametrize("case", ["FP8 expert", "W4A16 expert", "unlisted expert",
                                  "no table"])
def test_mixed_precision_refuses_experts_not_nvfp4(tmp_path, rng, capsys, case):
    src = tmp_path / "src"
    write_checkpoint(src, layers=2, experts=2, quant_algo="MIXED_PRECISION", seed=_seed(rng))
    module = "model.layers.1.mlp.experts.1.up_proj"
    if case == "FP8 expert":
        _edit_table(src, lambda t: t.__setitem__(module, {"quant_algo": "FP8"}))
        pats = [f"quantized_layers['{module}'] is 'FP8'", "NVFP4 experts only"]
    elif case == "W4A16 expert":
        _edit_table(src, lambda t: t.__setitem__(module, {"quant_algo": "W4A16_NVFP4",
                                                          "group_size": 16}))
        pats = ["'W4A16_NVFP4'", module]
    elif case == "unlisted expert":
        _edit_table(src, lambda t: t.pop(module))
        pats = [f"no entry for '{module}'"]
    else:
        _edit_table(src, lambda t: t.clear())
        pats = ["quantized_layers", "missing or empty"]
    with pytest.raises(CheckpointError) as info:
        jax_nvfp4.load(src)
    for pat in pats:
        assert pat in str(info.value), (pat, info.value)
    assert str(src / "config.json") in str(info.value)
    assert _cli.main(["convert", "--quiet", str(src), str(tmp_path / "dst")]) == 2
    assert str(info.value) in capsys.readouterr().err and not (tmp_path / "dst").exists()


def test_mixed_precision_parent_and_wildcard_entries(tmp_path, rng):
    # ModelOpt may list a parent module or a pattern; the closest entry decides.
    write_checkpoint(tmp_path, layers=1, experts=2, quant_algo="MIXED_PRECISION",
                     seed=_seed(rng))

    def edit(t):
        for k in [k for k in t if ".experts." in k]:
            del t[k]
        t["model.layers.0.mlp.experts"] = {"quant_algo": "NVFP4", "group_size": 16}
    _edit_table(tmp_path, edit)
    jax_nvfp4.load(tmp_path, prepare=False)

    def wildcard(t):
        del t["model.layers.0.mlp.experts"]
        t["model.layers.*.mlp.experts.*"] = {"quant_algo": "FP8"}
    _edit_table(tmp_path, wildcard)
    with pytest.raises(CheckpointError, match=r"model.layers.\*.mlp.experts.\*'\] is 'FP8'"):
        jax_nvfp4.load(tmp_path, prepare=False)


# -- family detection refusals ----------------------------------------------------------------


def test_experts_without_gate_need_a_non_gated_config(tmp_path, rng):
    # A Qwen3 checkpoint that lost every gate_proj looks like Nemotron-H's experts: only
    # config.json saying ReLU^2 makes a layer non-gated.
    tensors = write_checkpoint(tmp_path, layers=1, experts=2, seed=_seed(rng))
    rewrite(tmp_path, tensors, {n: None for n in tensors if ".experts." in n and "gate_proj" in n},
            index=True)
    with pytest.raises(CheckpointError, match="no gate_proj.*does not say the MoE is non-gated"):
        jax_nvfp4.load(tmp_path)


def test_non_gated_config_with_gated_experts_is_refused(tmp_path, rng):
    write_checkpoint(tmp_path, layers=1, experts=2, seed=_seed(rng))
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_hidden_act"] = "relu2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="says the experts are non-gated"):
        jax_nvfp4.load(tmp_path)


def test_stacked_transposed_layout_is_refused(tmp_path, rng):
    # ModelOpt's BMM export (Llama-4, gpt-oss) stores gate_up_proj as [E, H/2, 2I]: not a
    # contiguous [up; gate] per expert, so it is refused by name rather than misread.
    tensors = write_checkpoint(tmp_path, naming="gate_up_stacked", layers=1, experts=2,
                               hidden=256, intermediate=32, seed=_seed(rng))
    p = prefix("gate_up_stacked", 0)
    t = {f"{p}.{n}": np.ascontiguousarray(tensors[f"{p}.{n}"].transpose(0, 2, 1))
         for n in ("gate_up_proj", "gate_up_proj_weight_scale", "down_proj",
                   "down_proj_weight_scale")}
    rewrite(tmp_path, tensors, t)
    with pytest.raises(CheckpointError, match=r"looks transposed \(\[E, H/2, 2I\]"):
        jax_nvfp4.load(tmp_path)
