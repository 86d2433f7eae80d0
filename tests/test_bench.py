"""python -m jax_nvfp4 bench in its small CPU mode: runs, checks, writes the JSON schema (figures not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "jax_nvfp4", "bench", "--cpu", "--shape", "cpu-small",
                        "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| implementation |" in r.stdout
    data = json.loads(out.read_text())
    assert isinstance(data["device"], str) and data["copy_GBps"] > 0
    impls = {row["impl"] for row in data["rows"]}
    assert {"jax_nvfp4 xla donated", "jax_nvfp4 xla not donated", "copy floor"} <= impls
    for row in data["rows"]:
        assert set(row) == {"shape", "E", "H", "I", "impl", "ms", "x_floor", "device_ms",
                            "device_x_floor", "transient_bytes", "layer_bytes"}
        assert row["ms"] > 0 and row["layer_bytes"] > 0


def test_bench_bad_shape_is_a_user_error():
    r = subprocess.run([sys.executable, "-m", "jax_nvfp4", "bench", "--shape", "7,8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "expected one of" in r.stderr and "Traceback" not in r.stderr
