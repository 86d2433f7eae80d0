"""load(path): ModelOpt NVFP4 checkpoints to params, bit-exact, both namings, filters, sharding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.layout.spec import NAMES
from jax_nvfp4.testing import write_checkpoint
from ckpt_helpers import KERNEL, MOE, assert_kernel_scalars, kernel_reference, scalars, stacked
from helpers import assert_bytes_equal, to_jax

SCALES = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")


def _experts(params, naming, layer):
    return params["model"]["layers"][str(layer)][MOE[naming]]["experts"]


def _seed(rng):
    return int(rng.integers(2**31))


@pytest.mark.parametrize("naming", ["qwen3", "mixtral"])
def test_load_is_prepare_layer_on_the_stacked_experts(tmp_path, rng, naming):
    e = 3
    tensors = write_checkpoint(tmp_path, naming=naming, layers=2, experts=e, hidden=256,
                               intermediate=64, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path)
    for layer in range(2):
        moe = _experts(params, naming, layer)
        assert isinstance(moe, jax_nvfp4.PreparedLayer) and jax_nvfp4.is_prepared(moe)
        host = stacked(tensors, naming, layer, e)
        want = jax_nvfp4.prepare_layer(*to_jax(host))
        ref = _reference.prepare_layer(*host)
        for name, w, r in zip(NAMES, want, ref):
            assert moe[name].dtype == w.dtype and isinstance(moe[name], jax.Array)
            assert_bytes_equal(moe[name], w, name)
            assert_bytes_equal(moe[name], r, name)
        for name, w in scalars(tensors, naming, layer, e).items():
            assert moe[name].dtype == np.float32 and moe[name].shape == w.shape
            np.testing.assert_array_equal(np.asarray(moe[name]), w, err_msg=name)
        assert_kernel_scalars(moe, kernel_reference(tensors, naming, layer, e))
        # no per-expert tensor left; the marker leaf says "prepared" after a save and restore
        assert set(moe) == set(NAMES) | set(SCALES) | set(KERNEL) | {"nvfp4_layout"}
        assert (moe.hidden_size, moe.intermediate_size) == (256, 64)
    with pytest.raises(ValueError, match="already in the TRT-LLM layout"):
        jax_nvfp4.prepare(params)


def test_other_tensors_pass_through_unchanged(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, layers=2, experts=2, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path)
    flat = {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    others = {n: x for n, x in tensors.items() if ".experts." not in n}
    assert "model.layers.1.mlp.shared_expert.down_proj.weight_scale" in others  # float8
    assert "model.layers.0.mlp.gate.weight" in others and "lm_head.weight" in others
    for name, want in others.items():
        got = flat[name]
        assert isinstance(got, jax.Array) and got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert np.asarray(got).tobytes() == want.tobytes(), name
    assert len(flat) == len(others) + 2 * 13  # 12 arrays and the marker a layer


def test_unprepared_load_then_prepare(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, naming="mixtral", layers=1, experts=2, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path, prepare=False)
    moe = _experts(params, "mixtral", 0)
    assert type(moe) is dict and not jax_nvfp4.is_prepared(moe)
    host = stacked(tensors, "mixtral", 0, 2)
    for name, x in zip(NAMES, host):
        assert_bytes_equal(moe[name], x, name)  # checkpoint layout, rows [up (w3); gate (w1)]
    assert moe["w13_weight_scale"].dtype == jax.numpy.float8_e4m3fn
    assert_kernel_scalars(moe, kernel_reference(tensors, "mixtral", 0, 2))  # also unprepared
    out = jax_nvfp4.prepare(params)
    for name, r in zip(NAMES, _reference.prepare_layer(*host)):
        assert_bytes_equal(_experts(out, "mixtral", 0)[name], r, name)
    assert_kernel_scalars(_experts(out, "mixtral", 0), kernel_reference(tensors, "mixtral", 0, 2))


def test_padded_intermediate(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, layers=1, experts=2, intermediate=96, seed=_seed(rng))
    moe = _experts(jax_nvfp4.load(tmp_path), "qwen3", 0)
    assert moe["w13_weight"].shape == (2, 256, 128)
    assert (moe.hidden_size, moe.intermediate_size) == (256, 96)
    for name, r in zip(NAMES, _reference.prepare_layer(*stacked(tensors, "qwen3", 0, 2))):
        assert_bytes_equal(moe[name], r, name)


@pytest.mark.parametrize("hidden", [384, 192])  # a multiple of 128 but not 256; of 64 only
def test_padded_hidden(tmp_path, rng, hidden):
    tensors = write_checkpoint(tmp_path, layers=1, experts=2, hidden=hidden, intermediate=96,
                               seed=_seed(rng))
    moe = _experts(jax_nvfp4.load(tmp_path), "qwen3", 0)
    hp = -(-hidden // 256) * 256
    assert moe["w13_weight"].shape == (2, 256, hp // 2) and moe["w2_weight"].shape == (2, hp, 64)
    assert (moe.hidden_size, moe.intermediate_size) == (hidden, 96)
    want = jax_nvfp4.prepare_layer(*to_jax(stacked(tensors, "qwen3", 0, 2)))
    for name, w in zip(NAMES, want):
        assert_bytes_equal(moe[name], w, name)
    assert_kernel_scalars(moe, kernel_reference(tensors, "qwen3", 0, 2))


@pytest.mark.parametrize("prepare", [True, False])
def test_gate_and_up_scales_that_differ_are_exact(tmp_path, rng, prepare):
    e = 5
    tensors = write_checkpoint(tmp_path, layers=1, experts=e, split_gate_up=True,
                               seed=_seed(rng))
    moe = _experts(jax_nvfp4.load(tmp_path, prepare=prepare), "qwen3", 0)
    s13 = np.asarray(moe["w13_weight_scale_2"])
    assert (s13[:, 0] != s13[:, 1]).all()  # every expert's gate and up differ
    want = kernel_reference(tensors, "qwen3", 0, e)
    assert_kernel_scalars(moe, want)
    # ... and the values are jax_nvfp4.kernel_scales of the layer's own checkpoint scalars
    assert_kernel_scalars(moe, jax_nvfp4.kernel_scales(*(moe[n] for n in SCALES)))
    # the up half's scale, not the gate's (what vLLM's shortcut would give)
    a1, a2 = np.float32(np.asarray(moe["w13_input_scale"]).max()), np.asarray(
        moe["w2_input_scale"]).max()
    assert not np.array_equal(want["output1_scale_scalar"],
                              (a1 * s13[:, 0]) * (np.float32(1) / a2))


def test_synthetic_checkpoints_hold_finite_scales(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, layers=1, experts=3, seed=_seed(rng))
    for name, x in tensors.items():
        if name.endswith("weight_scale"):
            v = x.astype(np.float32)
            assert np.isfinite(v).all() and (v > 0).all() and v.max() <= 448, name
        if name.endswith(("weight_scale_2", "input_scale")):
            assert x.dtype == np.float32 and np.isfinite(x) and x > 0, name
    # gate and up share their scales by default, as ModelOpt exports MoE experts
    p = "model.layers.0.mlp.experts.1"
    for field in ("weight_scale_2", "input_scale"):
        assert tensors[f"{p}.gate_proj.{field}"] == tensors[f"{p}.up_proj.{field}"]
    moe = _experts(jax_nvfp4.load(tmp_path), "qwen3", 0)
    w13, w2 = jax_nvfp4.dequantize_layer(*(moe[n] for n in NAMES), layout="trtllm")
    assert np.isfinite(np.asarray(w13)).all() and np.isfinite(np.asarray(w2)).all()
    for name in KERNEL:
        assert np.isfinite(np.asarray(moe[name])).all(), name


def test_layers_filter(tmp_path, rng):
    write_checkpoint(tmp_path, layers=3, experts=2, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path, layers=[2], prepare=False)
    assert set(params["model"]["layers"]) == {"2"}
    assert "embed_tokens" in params["model"] and "lm_head" in params
    with pytest.raises(ValueError, match=r"no decoder layer \[5\].*0-2"):
        jax_nvfp4.load(tmp_path, layers=[0, 5])


@pytest.mark.parametrize("prepare", [False, True])
def test_sharded_over_experts_each_device_gets_its_own(tmp_path, rng, prepare):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    tensors = write_checkpoint(tmp_path, layers=1, experts=8, seed=_seed(rng))
    s = NamedSharding(Mesh(np.array(jax.devices("cpu")[:4]), ("expert",)), P("expert"))
    params = jax_nvfp4.load(tmp_path, prepare=prepare, sharding=s)
    moe = _experts(params, "qwen3", 0)
    want = stacked(tensors, "qwen3", 0, 8)
    if prepare:
        want = _reference.prepare_layer(*want)
    kernel = {n: w for n, w in kernel_reference(tensors, "qwen3", 0, 8).items() if w.ndim}
    for name, w in (list(zip(NAMES, want)) + list(scalars(tensors, "qwen3", 0, 8).items())
                    + list(kernel.items())):
        x = moe[name]
        assert x.sharding == s, (name, x.sharding)
        assert len(x.addressable_shards) == 4
        for sh in x.addressable_shards:
            assert sh.data.shape == (2, *w.shape[1:]), (name, sh.data.shape)
            assert sh.data.devices() == {sh.device}
            got = np.asarray(sh.data)
            assert np.array_equal(got.view(np.uint8) if got.itemsize == 1 else got,
                                  w[sh.index]), name
    emb = params["lm_head"]["weight"]
    assert len(emb.devices()) == 4 and emb.sharding.is_fully_replicated
    g = moe["hidden_states_global_scale"]  # one value: replicated on the same devices
    assert g.shape == () and len(g.devices()) == 4 and g.sharding.is_fully_replicated
    assert_kernel_scalars(moe, kernel_reference(tensors, "qwen3", 0, 8))


def test_bad_arguments(tmp_path, rng):
    write_checkpoint(tmp_path, layers=1, experts=2, seed=_seed(rng))
    with pytest.raises(TypeError, match="sharding must be a jax.sharding.Sharding"):
        jax_nvfp4.load(tmp_path, sharding="expert")
    with pytest.raises(TypeError, match="prepare must be a bool"):
        jax_nvfp4.load(tmp_path, prepare=None)


def _convert(src, dst):
    from jax_nvfp4.checkpoint import convert as _convert
    _convert.convert(src, dst, progress=False)


def test_converted_checkpoint_carries_the_kernel_scalars(tmp_path, rng):
    import json

    from safetensors import safe_open

    src, dst, e = tmp_path / "src", tmp_path / "dst", 3
    tensors = write_checkpoint(src, layers=2, experts=e, hidden=384, intermediate=96,
                               split_gate_up=True, seed=_seed(rng))
    _convert(src, dst)
    info = json.loads((dst / "jax_nvfp4.json").read_text())["moe_layers"]
    heads = {}
    for f in dst.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as h:
            heads.update((n, (h.get_slice(n).get_dtype(), h.get_slice(n).get_shape()))
                         for n in h.keys())
    loaded = jax_nvfp4.load(src)
    converted = jax_nvfp4.load(dst, prepare=False)
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        assert info[p] == {"experts": e, "hidden": 384, "intermediate": 96,
                           "padded_hidden": 512, "padded_intermediate": 128}
        for name in KERNEL:
            want = [] if name == "hidden_states_global_scale" else [e]
            assert heads[f"{p}.{name}"] == ("F32", want), name
        moe, ref = _experts(converted, "qwen3", layer), _experts(loaded, "qwen3", layer)
        assert isinstance(moe, jax_nvfp4.PreparedLayer)
        assert (moe.hidden_size, moe.intermediate_size) == (384, 96)
        assert set(moe) == set(ref)
        for name in moe:  # the same bytes as loading and preparing the source
            assert np.asarray(moe[name]).tobytes() == np.asarray(ref[name]).tobytes(), name
            assert moe[name].dtype == ref[name].dtype and moe[name].shape == ref[name].shape
        assert_kernel_scalars(moe, kernel_reference(tensors, "qwen3", layer, e))


def _without_kernel_scalars(path):
    """A converted checkpoint as convert wrote it before it stored the kernel's scalars."""
    import json

    from jax_nvfp4.checkpoint.read import open_checkpoint
    from ckpt_helpers import rewrite

    with open_checkpoint(path) as ckpt:
        everything = {n: ckpt.read(n) for n in ckpt.weight_map}
    rewrite(path, everything, {n: None for n in everything if n.endswith(KERNEL)}, index=True)
    meta = json.loads((path / "jax_nvfp4.json").read_text())
    for d in meta["moe_layers"].values():
        del d["padded_hidden"]
    (path / "jax_nvfp4.json").write_text(json.dumps(meta))


def test_reads_checkpoints_converted_before_the_kernel_scalars(tmp_path, rng):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors = write_checkpoint(src, layers=1, experts=2, split_gate_up=True, seed=_seed(rng))
    _convert(src, dst)
    _without_kernel_scalars(dst)
    moe = _experts(jax_nvfp4.load(dst, prepare=False), "qwen3", 0)
    assert (moe.hidden_size, moe.intermediate_size) == (256, 64)
    assert_kernel_scalars(moe, kernel_reference(tensors, "qwen3", 0, 2))  # computed on load


@pytest.mark.parametrize("case", ["missing", "shape", "value"])
def test_bad_kernel_scalars_in_a_converted_checkpoint(tmp_path, rng, case):
    from jax_nvfp4.checkpoint.read import open_checkpoint
    from ckpt_helpers import rewrite

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, layers=1, experts=2, seed=_seed(rng))
    _convert(src, dst)
    with open_checkpoint(dst) as ckpt:
        everything = {n: ckpt.read(n) for n in ckpt.weight_map}
    name = "model.layers.0.mlp.experts.output2_scale_scalar"
    change = {"missing": None, "shape": np.ones(3, np.float32),
              "value": np.array([1.0, -2.0], np.float32)}[case]
    rewrite(dst, everything, {name: change}, index=case == "missing")
    want = {"missing": "is missing", "shape": r"expected shape \[2\], got \[3\]",
            "value": r"value \[1\] -2.0 is not a positive finite scale"}[case]
    with pytest.raises(ValueError, match=f"{name}.*{want}" if case != "missing" else want):
        jax_nvfp4.load(dst, prepare=False)


def test_inspect_shows_the_activation_maxima_and_gate_up(tmp_path, rng):
    from jax_nvfp4.checkpoint import inspect as _inspect

    same, split = tmp_path / "same", tmp_path / "split"
    t = write_checkpoint(same, layers=1, experts=3, hidden=384, seed=_seed(rng))
    write_checkpoint(split, layers=1, experts=3, split_gate_up=True, seed=_seed(rng))
    s = scalars(t, "qwen3", 0, 3)
    text = _inspect.describe(same)
    assert "hidden H=384 (padded to 512), intermediate I=64" in text, text
    assert (f"model.layers.0.mlp.experts: a1={s['w13_input_scale'].max():.6g}, "
            f"a2={s['w2_input_scale'].max():.6g}, gate/up weight_scale_2 equal") in text, text
    assert "gate/up weight_scale_2 differ in 3 of 3 experts" in _inspect.describe(split)
    _convert(split, tmp_path / "dst")
    _without_kernel_scalars(tmp_path / "dst")
    assert "kernel scalars not stored: computed on load" in _inspect.describe(tmp_path / "dst")
