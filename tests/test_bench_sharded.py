"""benchmarks/sharded.py runs end to end (small, on 4 virtual CPU devices) and checks itself."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sharded.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_sharded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        _load().main(["--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (see conftest.py)")
def test_small_run_is_exact_and_reports_every_device_count(tmp_path):
    out = tmp_path / "sharded.json"
    assert _load().main(["--small", "--devices", "4", "--chunk-mib", "0.02", "--out", str(out)]) == 0
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
