"""Every script under benchmarks/ runs: its --help, a small run where the CPU can do one, a
clean refusal (exit 2, naming what is missing) where it needs a GPU, and a tiny run on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# script -> None (runs anywhere) or the words its refusal must contain off a GPU
SCRIPTS = {"sharded.py": None, "fixed_cost.py": None, "triton_profile.py": "needs a CUDA GPU",
           "tvm_ffi_route.py": "needs a CUDA GPU", "timeline.py": None}
GPU_ONLY = [name for name, refusal in SCRIPTS.items() if refusal]
ON_GPU = jax.devices()[0].platform == "gpu"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).stem}", BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_script_is_covered():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        _load(name).main(["--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.skipif(ON_GPU, reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("name", GPU_ONLY)
def test_refuses_without_a_gpu(name, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert _load(name).main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: ") and SCRIPTS[name] in err and "cpu" in err
    assert not out.exists()


def _gpu_test_groups() -> list[list[str]]:
    text = (BENCHMARKS / "gpu_tests.sh").read_text()
    body = text[text.index("groups=("):text.index(")", text.index("groups=("))]
    return [g.split() for g in re.findall(r'"([^"]+)"', body)]


def test_gpu_tests_sh_runs_every_file_with_gpu_tests_once():
    tests = Path(__file__).resolve().parent
    marked = sorted(f"tests/{p.name}" for p in tests.glob("test_*.py")
                    if re.search(r"pytest\.mark\.gpu\b", p.read_text()))
    grouped = [f for g in _gpu_test_groups() for f in g]
    assert len(_gpu_test_groups()) > 1 and sorted(grouped) == marked


@pytest.mark.skipif(ON_GPU, reason="runs the GPU tests themselves on a GPU")
def test_gpu_tests_sh_reports_each_group(tmp_path):
    # off a GPU every gpu test is skipped: each group must still run and report
    r = subprocess.run(["bash", str(BENCHMARKS / "gpu_tests.sh"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(_gpu_test_groups())
    for k, line in enumerate(lines):
        assert line.startswith(f"group {k} (") and "rc=0" in line and "skipped" in line, line
        assert "needs a CUDA device" in (tmp_path / f"gpu-tests-{k}.log").read_text()


def test_fixed_cost_small_run_reports_every_part(tmp_path):
    out = tmp_path / "fixed.json"
    assert _load("fixed_cost.py").main(["--rounds", "3", "--shape", "tiny",
                                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["donated"]) for r in rows} >= {("xla", True), ("xla", False)}
    for r in rows:
        parts = [r[k] for k in ("empty jit", "plan", "dispatch", "program", "prepare_layer")]
        assert all(p > 0 for p in parts), r
        assert r["device"] is None or r["device"] > 0


def test_timeline_small_run_splits_each_call(tmp_path):
    out = tmp_path / "timeline.json"
    assert _load("timeline.py").main(["--calls", "3", "--shape", "tiny", "--backend", "xla",
                                      "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["donated"] for r in rows} == {True, False}
    for r in rows:
        assert r["calls"] == 3 and r["call"] > 0
        # the jitted program's dispatch, recorded by the profiler
        assert any(name.startswith("PjitFunction(") for name in r["host_top"]), r["host_top"]
        if ON_GPU:  # the device's activity lies inside the call
            assert r["device_ops"] and 0 <= r["to first op"] < r["call"], r
            assert 0 < r["device busy"] <= r["on device"] + 1e-6


@pytest.mark.gpu
def test_triton_profile_tiny(tmp_path):
    out = tmp_path / "profile.json"
    assert _load("triton_profile.py").main(["--shape", "tiny", "--repeats", "2",
                                            "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"] == "tiny" and row["launches_inplace_count"] > 0
    for route in json.loads(out.read_text())["routes"]:
        assert row[f"program_{route}_donated_ms"] > 0


@pytest.mark.gpu
def test_tvm_ffi_route_swizzle_rows(tmp_path):
    out = tmp_path / "tvm_ffi.json"
    assert _load("tvm_ffi_route.py").main(["--repeats", "2", "--no-layers",
                                           "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"ffi new buffer", "ffi into donated"}
    assert all(r["device_ms"] > 0 for r in rows if r["method"] == "ffi into donated")


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (see conftest.py)")
def test_sharded_small_run_is_exact_and_reports_every_device_count(tmp_path):
    out = tmp_path / "sharded.json"
    assert _load("sharded.py").main(["--small", "--devices", "4", "--chunk-mib", "0.02",
                                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device_count"] == 4
    assert result["check"]["exact"] and result["check"]["sharding_kept"]
    assert result["check"]["shards_compared"] == 16
    assert result["check"]["experts_vs_numpy"] == [0, 4, 8, 12]
    rows = [(r["devices"], r["experts"], r["experts_per_device"]) for r in result["rows"]]
    assert rows == [(1, 4, 4), (1, 16, 16), (2, 16, 8), (4, 16, 4)]
    for r in result["rows"]:
        assert len(r["peak_extra_bytes"]) == r["devices"] and len(r["prepare_s"]) == 2
        # chunks, not a copy of the shard (one chunk on GPU; CPU moves float8 as float16)
        assert 0 < r["xla_scratch_bytes"] < r["bytes_per_device"] / 3


@pytest.mark.gpu
def test_triton_profile_tiles_sweep_is_bit_exact(tmp_path):
    out = tmp_path / "tiles.json"
    assert _load("triton_profile.py").main(["--shape", "tiny", "--tiles",
                                            "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    swept = [r for r in rows if "inplace_ms" in r]  # (the last row: the layer's copy)
    assert len(swept) == len(_load("triton_profile.py").TILES)
    assert all(r["bit_exact"] and r["inplace_ms"] > 0 for r in swept)
