"""convert SRC DST: the prepared checkpoint, its metadata, reloading it, the CLI, atomic writes,
resuming after a failure, --overwrite, deterministic bytes (faults: test_convert_faults.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import jax_nvfp4
from jax_nvfp4 import cli as _cli
from jax_nvfp4.checkpoint import convert as _convert, inspect as _inspect, load as _load
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.errors import UserError
from jax_nvfp4.checkpoint.read import INDEX, PREPARED_JSON, open_checkpoint
from jax_nvfp4.layout.spec import NAMES
from jax_nvfp4.testing import write_checkpoint
from ckpt_helpers import MOE, cli, prefix, scalars, stacked
from helpers import assert_bytes_equal, to_jax

SCALES = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")


def _seed(rng):
    return int(rng.integers(2**31))


def _headers(path: Path) -> dict:
    """name -> (dtype code, shape, metadata of its shard), from safetensors' own reader."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for n in h.keys():
                s = h.get_slice(n)
                out[n] = (s.get_dtype(), tuple(s.get_shape()), h.metadata())
    return out


@pytest.mark.parametrize("naming,intermediate", [("qwen3", 64), ("mixtral", 96)])
def test_convert_writes_prepare_layer_outputs(tmp_path, rng, naming, intermediate):
    src, dst = tmp_path / "src", tmp_path / "dst"
    e, layers = 2, 2
    tensors = write_checkpoint(src, naming=naming, layers=layers, experts=e,
                               intermediate=intermediate, seed=_seed(rng))
    summary = _convert.convert(src, dst, progress=False)
    assert summary["moe_layers"] == layers and summary["experts"] == layers * e
    heads = _headers(dst)
    index = json.loads((dst / INDEX).read_text())["weight_map"]
    assert set(index) == set(heads)  # the index is rewritten to the new shards
    assert all((dst / f).exists() for f in index.values())
    assert not any(".experts.0." in n for n in heads)  # no per-expert source tensor remains
    meta = json.loads((dst / PREPARED_JSON).read_text())
    assert meta["jax_nvfp4_version"] == jax_nvfp4.__version__ and meta["source"] == str(src)
    assert meta["layout"] == "trtllm_fp4_block_scale_moe" and meta["naming"] == naming
    for f in ("config.json", "hf_quant_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()

    params = jax_nvfp4.load(dst, prepare=False)
    for layer in range(layers):
        p = prefix(naming, layer)
        assert meta["moe_layers"][p]["intermediate"] == intermediate
        host = stacked(tensors, naming, layer, e)
        want = jax_nvfp4.prepare_layer(*to_jax(host))
        moe = params["model"]["layers"][str(layer)][MOE[naming]]["experts"]
        assert isinstance(moe, jax_nvfp4.PreparedLayer) and jax_nvfp4.is_prepared(moe)
        for name, w, r in zip(NAMES, want, _reference.prepare_layer(*host)):
            code, shape, md = heads[f"{p}.{name}"]
            assert code == ("F8_E4M3" if name.endswith("scale") else "U8") and shape == w.shape
            assert md["jax_nvfp4.version"] == jax_nvfp4.__version__
            assert_bytes_equal(moe[name], w, name)
            assert_bytes_equal(moe[name], r, name)
        for name, w in scalars(tensors, naming, layer, e).items():
            assert heads[f"{p}.{name}"][:2] == ("F32", w.shape)
            np.testing.assert_array_equal(np.asarray(moe[name]), w, err_msg=name)
    # other tensors are byte-identical, dtypes included
    with open_checkpoint(dst) as ckpt:
        for name, x in tensors.items():
            if ".experts." not in name:
                got = ckpt.read(name)
                assert got.dtype == x.dtype and got.shape == x.shape, name
                assert got.tobytes() == x.tobytes(), name
    # a prepared checkpoint is never prepared twice
    with pytest.raises(ValueError, match="already in the TRT-LLM layout"):
        jax_nvfp4.prepare(params)
    with pytest.raises(ValueError, match="already prepared.*prepare=False"):
        jax_nvfp4.load(dst)
    with pytest.raises(UserError, match="already prepared"):
        _convert.convert(dst, tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()


def test_prepared_then_loaded_equals_loaded_and_prepared(tmp_path, rng):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, layers=2, experts=2, seed=_seed(rng))
    _convert.convert(src, dst, progress=False)
    a = jax_nvfp4.load(src)
    b = jax_nvfp4.load(dst, prepare=False)
    la, lb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, p
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), p


def test_cli_convert_and_inspect(tmp_path, rng, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, naming="mixtral", layers=2, experts=3, seed=_seed(rng))
    text = _inspect.describe(src)
    for s in ("prepared: no", "naming: mixtral", "MoE layers: 2",
              "layers 0-1: experts E=3, hidden H=256, intermediate I=64"):
        assert s in text, text
    r = cli("convert", str(src), str(dst))
    assert r.returncode == 0, r.stderr
    assert "B/s" in r.stderr and "100%" in r.stderr  # the progress bar, with bytes
    for s in ("MoE layers: 2, experts: 6", "MiB read", "peak memory: host"):
        assert s in r.stdout, r.stdout
    assert _cli.main(["inspect", str(dst)]) == 0
    assert "prepared: yes" in capsys.readouterr().out
    # an existing DST is refused without --overwrite, and replaced with it
    before = sorted(p.name for p in dst.iterdir())
    r = cli("convert", str(src), str(dst))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert _cli.main(["convert", "--quiet", "--overwrite", str(src), str(dst)]) == 0
    assert sorted(p.name for p in dst.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _tree(path: Path) -> dict:
    """file name -> sha256 of its bytes, for every file under ``path``."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_keeps_partial_and_rerun_resumes(tmp_path, rng, monkeypatch, capsys,
                                                       error):
    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    write_checkpoint(src, layers=3, experts=2, seed=_seed(rng))
    _convert.convert(src, ref, progress=False)  # uninterrupted, for the bytes
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first layer's shard is already written
            raise error("boom")
        return _load.host_layer(*args, **kwargs)

    monkeypatch.setattr(_convert, "host_layer", failing)
    with pytest.raises(error):
        _convert.convert(src, dst, progress=False)
    assert len(calls) == 2
    # no DST, no lock; the partial directory is kept, its finished shards recorded
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dst.partial", "ref", "src"]
    assert "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.setattr(_convert, "host_layer", _load.host_layer)
    summary = _convert.convert(src, dst, progress=False, log=print)
    assert summary["reused_shards"] == 2  # the shard of non-layer tensors and layer 0
    assert "reusing model-00001-of-00004.safetensors" in capsys.readouterr().out
    assert _tree(dst) == _tree(ref)  # resumed = uninterrupted, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "ref", "src"]


def test_failed_overwrite_leaves_the_old_conversion(tmp_path, rng, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, layers=2, experts=2, seed=_seed(rng))
    _convert.convert(src, dst, progress=False)
    before = _tree(dst)

    def failing(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(_convert, "host_layer", failing)
    with pytest.raises(RuntimeError):
        _convert.convert(src, dst, overwrite=True, progress=False)
    assert _tree(dst) == before


def test_overwrite_replaces_only_a_conversion(tmp_path, rng):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, layers=1, experts=2, seed=_seed(rng))
    dst.mkdir()
    (dst / "keep").write_text("x")
    (dst / PREPARED_JSON).write_text(json.dumps({"format": "something else"}))
    for target in (dst, tmp_path / "file", tmp_path / "link"):
        if target.name == "file":
            target.write_text("x")
        elif target.name == "link":
            target.symlink_to(dst)
        with pytest.raises(UserError, match="not written by .*convert.*remove it yourself"):
            _convert.convert(src, target, overwrite=True, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == [PREPARED_JSON, "keep"]
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "link").is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    r = cli("convert", str(src), str(dst), "--overwrite")
    assert r.returncode == 2 and "not written by" in r.stderr and "Traceback" not in r.stderr


def test_same_source_same_bytes(tmp_path, rng):
    # safetensors writes metadata in hash order (a new order each process); convert sorts
    # it, so two conversions (in two processes) give the same bytes.
    src = tmp_path / "src"
    write_checkpoint(src, layers=2, experts=2, seed=_seed(rng))
    _convert.convert(src, tmp_path / "a", progress=False)
    r = cli("convert", "--quiet", str(src), str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b and len(a) > 4
    with safe_open(str(tmp_path / "a" / "model-00002-of-00003.safetensors"), "numpy") as h:
        assert list(h.keys()) == sorted(h.keys())


def test_writer_matches_safetensors(tmp_path, rng):
    # Our writer (streamed, hashed, sorted metadata) gives safetensors' own bytes: every
    # dtype convert writes, scalars and empty tensors; one metadata key (no order to vary).
    t = {"w": rng.integers(0, 256, (4, 6), dtype=np.uint8),
         "s": rng.integers(0, 256, (4, 3), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
         "b": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
         "f": rng.standard_normal(5).astype(np.float32), "x": np.array(1.5, np.float32),
         "e": np.zeros((0, 3), np.float32), "i": rng.integers(-9, 9, 3, dtype=np.int64)}
    for md in (None, {"k": "v \u00e9 \""}):
        rec = _convert.write_safetensors(t, tmp_path / "x.safetensors", md)
        data = (tmp_path / "x.safetensors").read_bytes()
        assert data == safetensors.numpy.save(t, md)
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(TypeError, match="'c'.*complex"):
        _convert.write_safetensors({"c": np.zeros(2, np.complex64)}, tmp_path / "y")


def test_dst_inside_src_is_refused(tmp_path, rng):
    write_checkpoint(tmp_path, layers=1, experts=2, seed=_seed(rng))
    with pytest.raises(UserError, match="inside the source"):
        _convert.convert(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="overwrite or sit inside"):
        _convert.convert(tmp_path, tmp_path, overwrite=True, progress=False)


def test_src_inside_dst_is_refused(tmp_path, rng):
    src = tmp_path / "models" / "src"
    write_checkpoint(src, layers=1, experts=2, seed=_seed(rng))
    (tmp_path / "models" / "other").write_text("keep me")
    with pytest.raises(UserError, match="sits inside"):  # --overwrite would delete models/
        _convert.convert(src, tmp_path / "models", overwrite=True, progress=False)
    assert (tmp_path / "models" / "other").read_text() == "keep me"
    assert (src / "config.json").exists()
