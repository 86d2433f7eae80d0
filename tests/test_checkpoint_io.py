"""Checkpoint I/O at disk speed: layers assembled on the host from bulk reads, one transfer per
array, no program per expert, scales checked before convert writes, read-ahead in convert,
bench-io (host memory: test_checkpoint_memory.py)."""

from __future__ import annotations

import errno
import json
import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_nvfp4
from jax_nvfp4.checkpoint import convert as _convert, load as _load
from jax_nvfp4.checkpoint.read import CheckpointError, open_checkpoint
from jax_nvfp4.layout.spec import NAMES
from jax_nvfp4.testing import write_checkpoint
from ckpt_helpers import host_layout as _host_layout, MOE, cli, prefix, rewrite, stacked
from ckpt_helpers import compiled_programs


def _seed(rng):
    return int(rng.integers(2**31))


@pytest.fixture
def puts(monkeypatch):
    """Every host->device transfer of a MoE array: (shape, dtype, device)."""
    calls = []
    real = _load._put

    def put(x, device):
        calls.append((x.shape, x.dtype, device))
        return real(x, device)

    monkeypatch.setattr(_load, "_put", put)
    return calls


@pytest.mark.parametrize("naming", ["qwen3", "mixtral"])
def test_read_layer_is_the_stacked_experts(tmp_path, rng, naming):
    e = 5
    tensors = write_checkpoint(tmp_path, naming=naming, layers=2, experts=e, intermediate=96,
                               seed=_seed(rng))
    ticks = []
    with open_checkpoint(tmp_path) as ckpt:
        for layer, x in enumerate(sorted(ckpt.moe, key=lambda x: x.layer)):
            host = _load.read_layer(ckpt, x, progress=ticks.append)
            want = stacked(tensors, naming, layer, e)
            for name, got, w in zip(NAMES, host.arrays, want):
                assert got.dtype == np.uint8 and got.shape == w.shape, name
                np.testing.assert_array_equal(got, w, err_msg=name)
            assert host.nbytes == sum(w.nbytes for w in want)
    assert sum(ticks) == 2 * host.nbytes


def test_a_prepared_checkpoint_is_read_in_one_piece_per_array(tmp_path, rng):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, layers=1, experts=6, seed=_seed(rng))
    _convert.convert(src, dst, progress=False)
    with open_checkpoint(dst) as ckpt:
        layer = ckpt.moe[0]
        shapes = layer.spec.shapes(padded=False)
        # stacked tensors: the experts' bytes follow each other in the file and the buffer
        runs = _load._plan(ckpt, layer, shapes, range(6))
        assert sum(len(iov) for _, _, iov in runs) == 4 and len(runs) <= 4, runs
        runs = _load._plan(ckpt, layer, shapes, [0, 1, 4, 5])
        assert sum(len(iov) for _, _, iov in runs) == 8, runs
        host = _load.read_layer(ckpt, layer)
        for name, got in zip(NAMES, host.arrays):
            assert got.tobytes() == ckpt.read(f"{layer.prefix}.{name}").tobytes(), name


def test_large_pieces_are_cut_into_tasks(tmp_path, rng, monkeypatch):
    # runs larger than TASK_BYTES are read by several threads; the bytes are the same
    monkeypatch.setattr(_load, "TASK_BYTES", 1000)
    tensors = write_checkpoint(tmp_path, layers=1, experts=3, seed=_seed(rng))
    with open_checkpoint(tmp_path) as ckpt:
        tasks = _load._tasks(_load._plan(ckpt, ckpt.moe[0], ckpt.moe[0].spec.shapes(
            padded=False), range(3)))
        sizes = [sum(n for _, _, iov in t for _, _, n in iov) for t in tasks]
        assert len(tasks) > 50 and max(sizes) == 1000, sizes
        host = _load.read_layer(ckpt, ckpt.moe[0])
    for name, got, w in zip(NAMES, host.arrays, stacked(tensors, "qwen3", 0, 3)):
        np.testing.assert_array_equal(got, w, err_msg=name)


@pytest.mark.parametrize("experts", [2, 16])
def test_one_transfer_per_array_whatever_the_experts(tmp_path, rng, puts, experts):
    layers = 2
    write_checkpoint(tmp_path, layers=layers, experts=experts, seed=_seed(rng))
    params = jax_nvfp4.load(tmp_path, prepare=False)
    shapes = [x.shape for x in params["model"]["layers"]["0"]["mlp"]["experts"].values()][:4]
    assert len(puts) == 4 * layers  # not 4 x E
    assert [s for s, _, _ in puts] == shapes * layers
    assert [str(d) for _, d, _ in puts] == ["uint8", "float8_e4m3fn"] * 2 * layers


def test_sharded_one_transfer_per_array_and_device(tmp_path, rng, puts):
    write_checkpoint(tmp_path, layers=1, experts=8, seed=_seed(rng))
    devices = jax.devices("cpu")[:4]
    s = NamedSharding(Mesh(np.array(devices), ("expert",)), P("expert"))
    moe = jax_nvfp4.load(tmp_path, prepare=False, sharding=s)["model"]["layers"]["0"]["mlp"][
        "experts"]
    assert len(puts) == 4 * 4
    assert all(shape[0] == 2 for shape, _, _ in puts)  # each device, its two experts
    assert sorted(d.id for _, _, d in puts) == sorted(d.id for d in devices for _ in NAMES)
    assert all(moe[n].sharding == s for n in NAMES)


def test_no_program_touches_the_layer_before_prepare(tmp_path, rng, caplog, monkeypatch):
    # The old loader compiled a dynamic_update_slice into the whole layer buffer (run once
    # per expert; on CPU XLA converted the whole float8 buffer to f16 and back for each).
    # Now no program sees a layer-sized array until prepare_layer's own (on the device;
    # on the host no program at all: test_checkpoint_host_layout.py).
    _host_layout(monkeypatch, False)
    e, h, i = 7, 384, 80  # shapes no other test compiles
    write_checkpoint(tmp_path, layers=2, experts=e, hidden=h, intermediate=i, seed=_seed(rng))
    sizes = [f"[{e},{2 * i},{h // 2}]", f"[{e},{2 * i},{h // 16}]", f"[{e},{h},{i // 2}]",
             f"[{e},{h},{i // 16}]"]
    logs = compiled_programs(caplog, lambda: jax.block_until_ready(
        jax_nvfp4.load(tmp_path, prepare=False)))
    assert not [m for m in logs if any(s in m for s in sizes)], logs
    # ... prepare=True compiles prepare_layer's program once, for both layers, on the padded
    # sizes (H 384 -> 512, I 80 -> 128): the layer is padded on the host as it is read, so on
    # an accelerator it is prepared in place, and no program sees the stored sizes
    logs = compiled_programs(caplog, lambda: jax.block_until_ready(jax_nvfp4.load(tmp_path)))
    assert not [m for m in logs if any(s in m for s in sizes)], logs
    padded = [f"[{e},256,256]", f"[{e},256,32]", f"[{e},512,64]", f"[{e},512,8]"]
    touching = [m for m in logs if all(s in m for s in padded) and "jit(f)" not in m]
    assert len(touching) == 1, logs  # prepare_layer's (jit(program); jit(f): the marks' samples)


def test_a_broken_scale_refuses_convert_before_anything_is_written(tmp_path, rng):
    src, dst = tmp_path / "src", tmp_path / "out" / "dst"
    tensors = write_checkpoint(src, layers=3, experts=3, seed=_seed(rng))
    bad = f"{prefix('qwen3', 2)}.1.down_proj.input_scale"  # the last layer
    rewrite(src, tensors, {bad: np.zeros((), np.float32)})
    with pytest.raises(CheckpointError, match=rf"{bad}.*not a positive finite scale"):
        _convert.convert(src, dst, progress=False)
    assert not (tmp_path / "out").exists()  # no directory, lock or partial
    r = cli("convert", str(src), str(dst))
    assert r.returncode == 2 and bad in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_convert_reads_the_next_layer_while_writing(tmp_path, rng, monkeypatch):
    src, ref = tmp_path / "src", tmp_path / "ref"
    write_checkpoint(src, layers=3, experts=2, seed=_seed(rng))
    _convert.convert(src, ref, progress=False)
    seen, real = [], _convert.read_layer

    def spy(ckpt, layer, **kw):
        seen.append((layer.layer, threading.current_thread().name))
        return real(ckpt, layer, **kw)

    monkeypatch.setattr(_convert, "read_layer", spy)
    _convert.convert(src, tmp_path / "dst", progress=False)
    assert [x for x, _ in seen] == [0, 1, 2]  # layer 0 while the non-layer shard is written
    assert all(name.startswith("jax_nvfp4-read-ahead") for _, name in seen), seen
    for f in ref.iterdir():
        assert (tmp_path / "dst" / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_read_error_ahead_is_raised_when_its_layer_is_due(tmp_path, rng, monkeypatch,
                                                            capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, layers=3, experts=2, seed=_seed(rng))
    real = _convert.read_layer

    def failing(ckpt, layer, **kw):
        if layer.layer == 2:
            raise OSError(errno.EIO, "Input/output error", str(ckpt.path / "x.safetensors"))
        return real(ckpt, layer, **kw)

    monkeypatch.setattr(_convert, "read_layer", failing)
    with pytest.raises(_convert.ConvertError, match=r"Input/output error.*x\.safetensors.*"
                                                    r"3 of 4 shards done"):
        _convert.convert(src, dst, progress=False)
    assert len(json.loads((_convert.partial_dir(dst) / _convert.MANIFEST).read_text())[
        "shards"]) == 3  # the shard written while it was read ahead is kept
    monkeypatch.undo()
    assert _convert.convert(src, dst, progress=False)["reused_shards"] == 3


def test_a_shard_cut_short_after_opening_is_named(tmp_path, rng):
    write_checkpoint(tmp_path, layers=1, experts=2, shards=1, seed=_seed(rng))
    with open_checkpoint(tmp_path) as ckpt:
        f = next(tmp_path.glob("*.safetensors"))
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
        with pytest.raises(CheckpointError, match=rf"{f}: cut short at byte .*truncated"):
            _load.read_layer(ckpt, ckpt.moe[0])


def test_loaded_bytes_are_unchanged(tmp_path, rng):
    # the fast path gives what prepare_layer gives on the stacked experts, sharded or not
    tensors = write_checkpoint(tmp_path, layers=1, experts=4, seed=_seed(rng))
    want = jax_nvfp4.prepare_layer(*stacked(tensors, "qwen3", 0, 4))
    s = NamedSharding(Mesh(np.array(jax.devices("cpu")[:2]), ("expert",)), P("expert"))
    for sharding in (None, s):
        moe = jax_nvfp4.load(tmp_path, sharding=sharding)["model"]["layers"]["0"][MOE["qwen3"]][
            "experts"]
        for name, w in zip(NAMES, want):
            assert np.asarray(moe[name]).tobytes() == np.asarray(w).tobytes(), name


def test_bench_io_reports_the_ratios(tmp_path):
    out = tmp_path / "r.json"
    r = cli("bench-io", "--row", "4,256,64,2", "--row", "8,400,80,1,nemotron_h", "--repeats",
            "1", "--layout", "both", "--tmp", str(tmp_path), "--json", str(out))
    assert r.returncode == 0, r.stderr
    for s in ("st read", "st read+write", "x st read", "x st read+write", "GB/s", "peak RSS",
              "layout on host", "prepare_layer on device", "not gated", "ms a layer"):
        assert s in r.stdout, r.stdout
    res = json.loads(out.read_text())
    assert [x["name"] for x in res["rows"]] == ["4,256,64,2", "8,400,80,1,nemotron_h"]
    for row, layers in zip(res["rows"], (2, 1)):
        assert row["bytes"] > row["layer_bytes"] > 0 and row["moe_layers"] == layers
        steps = row["steps"]
        assert set(steps) == {"raw_read", "safetensors_read", "safetensors_read_write",
                              "load_raw", "load_host", "load_device", "convert_host",
                              "convert_device"}
        for step in ("load_host", "load_device"):
            assert steps[step]["ratio"] == steps[step]["s"] / steps["safetensors_read"]["s"]
        assert steps["convert_host"]["ratio"] > 0 and steps["load_raw"]["peak_rss_bytes"] >= 0
        # no device statistics on CPU: no device column, rather than a zero
        assert all(d["peak_device_bytes"] is None for d in steps.values())
    assert "device +" not in r.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # temporaries removed


class _FakeDevice:
    """A GPU's bytes in use and JAX's never-reset peak, as ``memory_stats`` gives them."""

    platform = "gpu"

    def __init__(self, in_use, peak):
        self.in_use, self.peak = in_use, peak

    def set(self, n):
        self.in_use, self.peak = n, max(self.peak, n)

    def memory_stats(self):
        return {"bytes_in_use": self.in_use, "peak_bytes_in_use": self.peak}


@pytest.mark.parametrize("scratch_s, earlier_peak", [(0.0, 0), (0.05, 10**6)])
def test_bench_io_device_peak_is_the_scratch_beyond_input_and_result(scratch_s, earlier_peak):
    import time

    from jax_nvfp4.bench import io as bench_io

    dev = _FakeDevice(1000, max(1000, earlier_peak))

    def step():  # given 1000 bytes; 700 of scratch on top of a 300-byte result, then freed
        dev.set(2000)
        time.sleep(scratch_s)
        dev.set(1300)
        return "params"

    # A new process peak is read exactly even if no poll saw it (scratch_s 0); under an
    # earlier, higher peak only polling sees the scratch (held 50 ms here).
    assert bench_io._device_peak(step, dev) == 2000 - 1300
    assert bench_io._device_peak(step, jax.devices("cpu")[0]) is None  # no statistics: None, not 0


def test_bench_io_report_shows_the_device_peak_where_measured():
    from jax_nvfp4.bench import io as bench_io

    step = {"s": 0.5, "runs": [0.5], "gb_per_s": 2.0, "peak_rss_bytes": 10,
            "peak_rss_layers": 1.0, "ratio": None}
    res = {"bytes": 10**9, "layer_bytes": 10**8, "moe_layers": 2, "shape": None, "repeats": 1,
           "cache": "warm", "steps": {"load": dict(step, peak_device_bytes=5 * 10**6,
                                                   peak_device_layers=0.05),
                                      "raw_read": dict(step, peak_device_bytes=None,
                                                       peak_device_layers=None)}}
    lines = bench_io.report([("x", res)]).splitlines()
    assert "device + 0.05 layers" in next(x for x in lines if x.strip().startswith("load"))
    assert "device" not in next(x for x in lines if "raw read" in x)


def test_bench_io_row_errors():
    r = cli("bench-io", "--row", "4,256")
    assert r.returncode == 2 and "E,H,I,LAYERS" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's warning; no JAX in the child
def test_a_forked_child_reads_with_its_own_threads(tmp_path, rng):
    # the read pool's threads do not survive fork(); a child must not wait on them
    import os
    import select
    import signal

    tensors = write_checkpoint(tmp_path, layers=1, experts=2, seed=_seed(rng))
    with open_checkpoint(tmp_path) as ckpt:
        _load.read_layer(ckpt, ckpt.moe[0])  # the parent's pool exists now
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: read the layer again and report its bytes
            try:
                host = _load.read_layer(ckpt, ckpt.moe[0])
                os.write(w, b"ok" if host.arrays[0].tobytes() == stacked(
                    tensors, "qwen3", 0, 2)[0].tobytes() else b"bad")
            finally:
                os._exit(0)
        os.close(w)
        ready, _, _ = select.select([r], [], [], 20)  # a child stuck on dead threads: killed
        got = os.read(r, 8) if ready else b"stuck"
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert got == b"ok"


def test_load_reads_the_next_layer_while_one_moves_to_the_device(tmp_path, rng, monkeypatch):
    tensors = write_checkpoint(tmp_path, layers=3, experts=2, seed=_seed(rng))
    seen, real = [], _load.read_layer

    def spy(ckpt, layer, **kw):
        seen.append((layer.layer, threading.current_thread().name))
        return real(ckpt, layer, **kw)

    monkeypatch.setattr(_load, "read_layer", spy)
    params = jax_nvfp4.load(tmp_path, prepare=False)
    assert [x for x, _ in seen] == [0, 1, 2]
    assert not seen[0][1].startswith("jax_nvfp4-read-ahead"), seen
    assert all(name.startswith("jax_nvfp4-read-ahead") for _, name in seen[1:]), seen
    for layer in range(3):
        moe = params["model"]["layers"][str(layer)]["mlp"]["experts"]
        for name, w in zip(NAMES, stacked(tensors, "qwen3", layer, 2)):
            assert np.asarray(moe[name]).view(np.uint8).tobytes() == w.tobytes(), name

    def failing(ckpt, layer, **kw):  # an error while reading ahead: raised, nothing left over
        if layer.layer == 2:
            raise CheckpointError("boom")
        return real(ckpt, layer, **kw)

    monkeypatch.setattr(_load, "read_layer", failing)
    with pytest.raises(CheckpointError, match="boom"):
        jax_nvfp4.load(tmp_path)
    assert not [t for t in threading.enumerate() if t.name.startswith("jax_nvfp4-read-ahead")]


def test_other_tensors_of_every_size_and_dtype(tmp_path, rng):
    # read_tensors gives what Checkpoint.read gives: empty, 0-d, bf16, float8, int64, large
    import ml_dtypes
    from safetensors.numpy import save_file

    tensors = write_checkpoint(tmp_path, layers=1, experts=2, shards=1, seed=_seed(rng))
    extra = {"extra.empty": np.zeros((0, 3), np.float32), "extra.scalar": np.array(2.5, np.float32),
             "extra.i64": rng.integers(-9, 9, 5, dtype=np.int64),
             "extra.f8": rng.integers(0, 256, (3, 4), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
             "extra.big": rng.standard_normal((1 << 19) + 3).astype(ml_dtypes.bfloat16)}
    shard = next(tmp_path.glob("*.safetensors"))
    save_file({**tensors, **extra}, shard)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, shard.name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as ckpt:
        names = [n for n in ckpt.weight_map if ".experts." not in n]
        got = _load.read_tensors(ckpt, names)
        for name in names:
            want = ckpt.read(name)
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            assert got[name].tobytes() == want.tobytes(), name
    params = jax_nvfp4.load(tmp_path, prepare=False)
    assert params["extra"]["empty"].shape == (0, 3) and float(params["extra"]["scalar"]) == 2.5
