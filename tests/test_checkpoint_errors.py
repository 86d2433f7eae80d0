"""Bad checkpoints: each gives a clear error naming the file and tensor, and loses nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4 import cli as _cli
from jax_nvfp4.checkpoint import load as _load
from jax_nvfp4.checkpoint.read import INDEX
from jax_nvfp4.testing import experts_prefix, write_checkpoint
from ckpt_helpers import cli, edit_json, rewrite, shard_of

P = "model.layers.1.mlp.experts"


def _corrupt(case, path, tensors):
    """Break the checkpoint at ``path``; returns regexes the error must match."""
    name = f"{P}.2.up_proj.weight_scale"
    shard = shard_of(path, name)
    if case == "missing shard":
        shard.unlink()
        return [str(shard), "shard not found"]
    if case == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
        return [str(shard), "truncated"]
    if case == "tensor missing from the index":
        rewrite(path, tensors, {name: None}, index=True)
        return [str(path / INDEX), name, "missing", "expert 2"]
    if case == "tensor missing from its shard":
        rewrite(path, tensors, {name: None})
        return [str(shard), name, "not in this shard"]
    if case == "inconsistent shapes":
        name = f"{P}.3.down_proj.weight"
        rewrite(path, tensors, {name: tensors[name][:, :16]})
        return [str(shard_of(path, name)), name, r"expected shape \[256, 32\]", r"\[256, 16\]"]
    if case == "wrong dtype":
        name = f"{P}.1.gate_proj.weight_scale"
        rewrite(path, tensors, {name: tensors[name].view(np.uint8)})
        return [str(shard_of(path, name)), name, "expected dtype F8_E4M3, got U8"]
    if case == "zero input scale":
        name = f"{P}.3.up_proj.input_scale"
        rewrite(path, tensors, {name: np.array(0, np.float32)})
        return [str(shard_of(path, name)), name, "0.0 is not a positive finite scale", "broken"]
    if case == "NaN weight_scale_2":
        name = f"{P}.0.down_proj.weight_scale_2"
        rewrite(path, tensors, {name: np.array(np.nan, np.float32)})
        return [str(shard_of(path, name)), name, "nan is not a positive finite scale"]
    if case == "unsupported quant_algo":
        edit_json(path / "config.json",
                  lambda c: c["quantization_config"].__setitem__("quant_algo", "FP8"))
        return [str(path / "config.json"), "quant_algo is 'FP8'", "only 'NVFP4'"]
    raise AssertionError(case)


CASES = ["missing shard", "truncated shard", "tensor missing from the index",
         "tensor missing from its shard", "inconsistent shapes", "wrong dtype",
         "unsupported quant_algo"]


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint(tmp_path, rng, capsys, case):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors = write_checkpoint(src, layers=2, experts=4, seed=int(rng.integers(2**31)))
    patterns = _corrupt(case, src, tensors)
    with pytest.raises(ValueError) as info:
        jax_nvfp4.load(src)
    for pat in patterns:
        assert pat in str(info.value) or re.search(pat, str(info.value)), (pat, info.value)
    # the CLI: the same message, no traceback, exit 2, no DST
    assert _cli.main(["convert", "--quiet", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(info.value) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("case", ["zero input scale", "NaN weight_scale_2"])
def test_broken_scale_values(tmp_path, rng, capsys, case):
    # Values are read as the layers' scalars are, not with the headers: load checks every
    # layer's before loading any; convert fails on the layer, keeping its partial output.
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors = write_checkpoint(src, layers=2, experts=4, seed=int(rng.integers(2**31)))
    patterns = _corrupt(case, src, tensors)
    calls = []
    real = _load.load_layer
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_load, "load_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
        with pytest.raises(ValueError) as info:
            jax_nvfp4.load(src)
    assert calls == []  # refused before any layer was loaded
    for pat in patterns:
        assert pat in str(info.value) or re.search(pat, str(info.value)), (pat, info.value)
    assert _cli.main(["convert", "--quiet", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert str(info.value) in err and "Traceback" not in err and not dst.exists()


def test_hidden_not_a_multiple_of_16(tmp_path, rng):
    # (H % 128 is padded on load: tests/test_checkpoint_load.py::test_padded_hidden)
    write_checkpoint(tmp_path, layers=1, experts=2, hidden=200, seed=int(rng.integers(2**31)))
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    r = cli("convert", str(tmp_path), str(tmp_path.parent / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(shard_of(tmp_path, name)) in r.stderr and name in r.stderr
    assert "hidden size H = 2 x shape[1] = 200 must be a multiple of 16" in r.stderr
    assert not (tmp_path.parent / "out").exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="neither model.safetensors.index.json nor"):
        jax_nvfp4.load(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        jax_nvfp4.load(tmp_path / "nope")


# -- the expert count: config.json and the router say E; the index must hold all E ----------

COUNT_FIELD = {"qwen3": "num_experts", "nemotron_h": "n_routed_experts",
               "minimax_m2": "num_local_experts", "gemma4": "text_config.num_experts",
               "gate_up": "num_experts"}


@pytest.mark.parametrize("naming", sorted(COUNT_FIELD))
def test_missing_last_expert_is_refused(tmp_path, rng, capsys, naming):
    # Every tensor of layer 1's last expert gone from the index (and its shards): loading
    # would give E = 3 while the config and the router say 4. That is data loss.
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors = write_checkpoint(src, naming=naming, layers=2, experts=4,
                               seed=int(rng.integers(2**31)))
    p = experts_prefix(naming, 1)
    gone = {n: None for n in tensors if n.startswith(f"{p}.3.")}
    assert len(gone) >= 8
    rewrite(src, tensors, gone, index=True)
    with pytest.raises(ValueError) as info:
        jax_nvfp4.load(src)
    msg = str(info.value)
    router = {"gemma4": "router.proj.weight"}.get(naming, "gate.weight")
    for pat in (f"layer 1 ({p})", "no tensors for expert 3", f"{COUNT_FIELD[naming]} = 4",
                "has 4 rows", router, "the index has experts 0-2", "refusing to load 3 of 4"):
        assert pat in msg, (pat, msg)
    assert _cli.main(["convert", "--quiet", str(src), str(dst)]) == 2
    assert msg in capsys.readouterr().err and not dst.exists()


def test_stacked_experts_fewer_than_the_config(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, naming="gate_up_stacked", layers=1, experts=4,
                               seed=int(rng.integers(2**31)))
    p = experts_prefix("gate_up_stacked", 0)
    cut = {n: tensors[n][:3] for n in tensors if n.startswith(p + ".") and tensors[n].ndim}
    rewrite(tmp_path, tensors, cut)
    with pytest.raises(ValueError, match=r"no tensors for expert 3 .*num_experts = 4.*holds 3 "):
        jax_nvfp4.load(tmp_path)


def _four_experts(path, rng, num_experts):
    """A one-layer checkpoint of 4 experts whose config.json says ``num_experts`` (None:
    no count at all); its tensors."""
    tensors = write_checkpoint(path, layers=1, experts=4, seed=int(rng.integers(2**31)))
    edit_json(path / "config.json", lambda c: c.pop("num_experts") if num_experts is None
              else c.update(num_experts=num_experts))
    return tensors


def test_expert_count_from_router_alone(tmp_path, rng):
    # No count in config.json: the router's rows still catch the missing expert.
    tensors = _four_experts(tmp_path, rng, None)
    rewrite(tmp_path, tensors, {n: None for n in tensors if ".experts.3." in n}, index=True)
    with pytest.raises(ValueError, match=r"no tensors for expert 3 \(router 'model.layers.0.mlp"
                                         r".gate.weight' has 4 rows"):
        jax_nvfp4.load(tmp_path)


def test_expert_counts_that_disagree(tmp_path, rng):
    _four_experts(tmp_path, rng, 8)
    with pytest.raises(ValueError, match=r"expert counts disagree: .*num_experts = 8; router "
                                         r"'model.layers.0.mlp.gate.weight' has 4 rows"):
        jax_nvfp4.load(tmp_path)


def test_more_experts_than_the_config(tmp_path, rng):
    _four_experts(tmp_path, rng, 3)
    # (the router, 4 rows, disagrees too: drop it to see the count check on its own)
    edit_json(tmp_path / INDEX, lambda d: d["weight_map"].pop("model.layers.0.mlp.gate.weight"))
    with pytest.raises(ValueError, match=r"expert 3 beyond 3 \(.*num_experts = 3"):
        jax_nvfp4.load(tmp_path)
