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
    assert {"jax_nvfp4 xla donated", "jax_nvfp4 xla not donated", "copy floor",
            "jax_nvfp4 auto donated (-> xla)"} <= impls
    for row in data["rows"]:
        assert set(row) == {"shape", "E", "H", "I", "gated", "Hp", "Ip", "impl", "ms",
                            "x_floor", "device_ms", "device_x_floor", "transient_bytes",
                            "layer_bytes", "floor_bytes"}
        assert row["ms"] > 0 and row["layer_bytes"] > 0
    assert {"jax", "jaxlib", "torch", "triton", "flashinfer-python"} <= set(data["versions"])
    assert data["versions"]["jax"] and "commit" in data and data["card"] == "cpu"
    assert [(a["shape"], a["donated"]) for a in data["auto"]] == [("cpu-small", True),
                                                                  ("cpu-small", False)]


def test_bench_padded_not_gated_and_a_whole_model_are_checked_and_named(tmp_path):
    """Padded and non-gated shapes run against the zero-padded reference; --model times
    prepare(params) per layer; --out-dir names the file by card, date and commit."""
    r = subprocess.run([sys.executable, "-m", "jax_nvfp4", "bench", "--cpu", "--no-torch",
                        "--shape", "cpu-padded", "--shape", "8,384,192,ng", "--repeats", "1",
                        "--model", "cpu-padded:2", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900,
                       env=dict(__import__("os").environ, JAX_NVFP4_COMMIT="abc123"))
    assert r.returncode == 0, r.stderr
    (path,) = tmp_path.glob("cpu-*-abc123.json")
    assert (tmp_path / path.name.replace(".json", ".md")).exists()
    data = json.loads(path.read_text())
    rows = {(row["shape"], row["impl"]): row for row in data["rows"]}
    padded = rows[("cpu-padded", "jax_nvfp4 xla donated")]
    assert (padded["H"], padded["Hp"], padded["I"], padded["Ip"]) == (384, 512, 96, 128)
    assert padded["floor_bytes"] > 2 * padded["layer_bytes"]  # written padded
    assert not rows[("8,384,192,ng", "jax_nvfp4 xla donated")]["gated"]
    assert [m["impl"] for m in data["models"]] == ["jax_nvfp4 prepare(params) donated",
                                                    "jax_nvfp4 prepare_layer loop donated"]
    assert all(m["layers"] == 2 and m["ms_per_layer"] > 0 for m in data["models"])
    assert "per layer" in r.stdout


def test_bench_bad_shape_is_a_user_error():
    r = subprocess.run([sys.executable, "-m", "jax_nvfp4", "bench", "--shape", "7,8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "expected one of" in r.stderr and "Traceback" not in r.stderr


def test_variants_are_timed_round_by_round_and_a_failing_one_is_dropped(capsys):
    from jax_nvfp4.bench import layout

    calls = []

    class Fake:
        def __init__(self, label, fail_at=None):
            self.label, self.fail_at, self.wall, self.device = label, fail_at, [], []

        def time_wall(self):
            calls.append(self.label)
            if len(self.wall) == self.fail_at:
                raise RuntimeError("out of memory")
            self.wall.append(float(len(calls)))

    a, b, c = Fake("a"), Fake("b", fail_at=2), Fake("c")
    before = len(layout.FAILURES)
    try:
        alive = layout._interleaved([a, b, c], "time_wall", rounds=5, warmup=1, label="s")
        assert alive == [a, c]
        # one warm-up round, then five rounds of every variant once, in a fresh order each
        # round (b fails at its third timed call and is not called again)
        rounds = [calls[:3], calls[3:6], calls[6:9]]
        assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
        assert calls.count("b") == 4 and calls.count("a") == calls.count("c") == 6
        assert len({tuple(r) for r in rounds + [calls[9:12]]}) > 1  # not one fixed order
        assert len(a.wall) == len(c.wall) == 5  # the warm-up's samples dropped
        assert a.wall == sorted(a.wall) and a.wall[0] > 3
        assert layout.FAILURES[before:] == ["s b: RuntimeError"]
        assert "FAILED: s jax_nvfp4 b" in capsys.readouterr().out
    finally:
        del layout.FAILURES[before:]


def test_small_layers_get_more_rounds():
    from jax_nvfp4.bench import layout
    from jax_nvfp4.layout.spec import LayerSpec

    assert layout.rounds_for(LayerSpec(8, 256, 128, True), 5) == layout.SMALL_LAYER_ROUNDS
    assert layout.rounds_for(LayerSpec(8, 256, 128, True), 5, 0) == 5
    assert layout.rounds_for(LayerSpec(256, 7168, 2048, True), 5) == 5


def test_whole_model_check_catches_layers_swapped(monkeypatch):
    """The whole-model rows are timed only after every layer matched its rolled reference:
    a prepare that returns two layers in each other's place fails."""
    import jax
    import pytest

    from jax_nvfp4.bench import layout as bench
    from jax_nvfp4.tree import prepare as tree

    real = tree.prepare

    def swapped(params, **kw):
        out = real(params, **kw)
        if len(out) > 1:
            out["layers.0.mlp.experts"], out["layers.1.mlp.experts"] = (
                out["layers.1.mlp.experts"], out["layers.0.mlp.experts"])
        return out

    device = jax.devices()[0]
    rows = bench.whole_model("cpu-small", bench.CPU_SHAPES["cpu-small"], 3, device, 1e10)
    assert [r["layers"] for r in rows] == [3, 3]
    monkeypatch.setattr(tree, "prepare", swapped)
    with pytest.raises(AssertionError, match="prepare\\(params\\) layer 0: w13_weight differs"):
        bench.whole_model("cpu-small", bench.CPU_SHAPES["cpu-small"], 3, device, 1e10)
