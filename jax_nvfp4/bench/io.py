"""``python -m jax_nvfp4 bench-io``: load and convert against safetensors' own read of the shards.

Per checkpoint (``PATH``, or synthetic ones written to a temporary directory: by default
a suite of rows, two shapes, E scaling at constant bytes and layer scaling), in one
run, after one untimed pass that fills the page cache and compiles (``--cold``: each
timed run starts with the shards evicted from it): the time safetensors itself needs
to read every tensor of the shards (``safe_open(..., framework="numpy").get_tensor``;
float8, which numpy lacks, through torch's reader, materialized), the same plus
writing them back (``safetensors.torch.save_file`` and fsync), the raw read of the
files (one thread, like ``cat``), ``load`` (MoE layers prepared, every array ready on
device; and with ``prepare=False``) and ``convert`` (written and fsynced), with the
peak RSS above the start of each and, for load and convert on an accelerator, the peak
device memory of their untimed pass above what it was given and what it returns (for
``load``: the layout's scratch beyond the loaded params), both in units of the largest
decoder layer's bytes.
Ratios: load / read, convert / (read + write). Each time is the best of ``--repeats``.
``--layout both`` times load and convert with the layout made on the host and by
``prepare_layer`` on the device (``options.host_layout``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..checkpoint.convert import _fsync

# The default suite: (name, E, H, I, layers, naming). Two shapes (Qwen3-30B-A3B-like with
# fewer experts; Nemotron-3-Nano's non-gated experts, H and I padded); E=256 small
# experts against E=16 large ones of the same bytes; 1, 2 and 4 layers of one shape.
SUITE = [("qwen3-30b-a3b/2", 64, 2048, 768, 2, "qwen3"),
         ("nemotron-3-nano/4", 32, 2688, 1856, 1, "nemotron_h"),
         ("E=256", 256, 1024, 256, 2, "qwen3"), ("E=16", 16, 4096, 1024, 2, "qwen3"),
         ("L=1", 32, 2048, 768, 1, "qwen3"), ("L=2", 32, 2048, 768, 2, "qwen3"),
         ("L=4", 32, 2048, 768, 4, "qwen3")]


def configure(p):
    p.add_argument("path", metavar="PATH", nargs="?",
                   help="checkpoint directory (default: synthetic ones, see --row)")
    p.add_argument("--row", action="append", default=[], metavar="E,H,I,LAYERS[,NAMING]",
                   help="a synthetic checkpoint to measure (repeatable; default: a suite of "
                        "two shapes, E=256 vs E=16 at equal bytes, 1/2/4 layers); NAMING a "
                        "family of jax_nvfp4.testing.write_checkpoint (qwen3)")
    for name, help_ in (("experts", "E"), ("layers", "decoder layers"), ("hidden", "H"),
                        ("intermediate", "I")):  # one row (defaults E=128, 2, 2048, 768)
        p.add_argument(f"--{name}", type=int, default=None, help=f"one synthetic row: {help_}")
    p.add_argument("--shards", type=int, default=3, help="synthetic: shard files (3)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each step (2)")
    p.add_argument("--layout", choices=("auto", "host", "device", "both"), default="auto",
                   help="where load and convert make the kernel's layout (auto: "
                        "checkpoint.load.layout_on_host's rule; both: each timed)")
    p.add_argument("--cold", action="store_true",
                   help="evict the shards from the page cache before each timed run")
    p.add_argument("--tmp", default=None, help="where to write temporary checkpoints")
    p.add_argument("--json", "--out", dest="json", default=None,
                   help="write the results as JSON to this file")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: load,convert")


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _raw_read(path: Path) -> int:
    """Every shard's bytes into one buffer, one thread (what ``cat`` does): the read limit."""
    import numpy as np
    n, buf = 0, None
    for f in _shards(path):
        size = f.stat().st_size
        if buf is None or buf.size < size:
            buf = np.empty(size, np.uint8)
        with open(f, "rb", buffering=0) as fh:
            n += fh.readinto(memoryview(buf)[:size])
    return n


def _st_read(path: Path, keep=None) -> int:
    """Every tensor of every shard through safetensors, in process memory; ``keep(file, d)``.

    numpy's reader copies each tensor out of the file; numpy has no float8, so those
    come from torch's reader, whose tensors are zero-copy views of the file (mmap),
    materialized with ``clone()`` (without torch: read as bytes, as the loader does).
    """
    from safetensors import safe_open
    try:
        import torch
    except ImportError:
        torch = None
    n = 0
    for f in _shards(path):
        tensors = {}
        with safe_open(str(f), framework="numpy") as h:
            f8 = [k for k in h.keys() if h.get_slice(k).get_dtype().startswith("F8")]
            for name in h.keys():
                if name not in f8:
                    tensors[name] = h.get_tensor(name)
        if f8 and torch is not None:
            with safe_open(str(f), framework="pt") as h:
                tensors.update((k, h.get_tensor(k).clone()) for k in f8)
        elif f8:
            from ..checkpoint.read import _Shard
            shard = _Shard(f)
            tensors.update((k, shard.read(k)) for k in f8)
        n += sum(x.nbytes for x in tensors.values())
        if keep is not None:
            keep(f, tensors)
        del tensors
    return n


def _to_torch(torch, x):
    """numpy -> torch without a copy; ml_dtypes' bfloat16 and float8 through their bits."""
    name = str(x.dtype)
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        bits = {1: "uint8", 2: "int16"}[x.dtype.itemsize]
        return torch.from_numpy(x.view(bits)).view(getattr(torch, name))
    return torch.from_numpy(x)


def _st_read_write(path: Path, out: Path) -> int:
    """:func:`_st_read`, each shard then written with safetensors' writer and fsynced."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        torch = None
        from ..checkpoint.convert import write_safetensors as save_file

    def write(f, tensors):
        dst = out / f.name
        if torch is not None:
            tensors = {k: v if isinstance(v, torch.Tensor) else _to_torch(torch, v)
                       for k, v in tensors.items()}
        save_file(tensors, str(dst))
        _fsync(dst)
    n = _st_read(path, write)
    _fsync(out)
    return n


def _load_params(path: Path, prepare=True):
    import jax

    from ..checkpoint.load import load
    params = load(path, prepare=prepare)
    jax.block_until_ready(params)
    return params


def _rss() -> int:
    """This process's resident bytes now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class _PeakRSS:
    """The peak RSS above the start while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.above = self.peak - self.start


def _evict(path: Path):
    """The shards' pages dropped from the page cache (clean pages: no privileges needed)."""
    for f in _shards(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _best(fn, repeats: int, before=None) -> tuple[float, list[float], int]:
    """Best time of ``repeats`` runs of ``fn``, every time, and the largest peak RSS above
    the start of a run (``before()`` runs first, untimed)."""
    times, peak = [], 0
    for _ in range(repeats):
        if before is not None:
            before()
        with _PeakRSS() as rss:  # (the result, e.g. the loaded params, still held at the end)
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        del out
        peak = max(peak, rss.above)
    return min(times), times, peak


def _device_peak(fn, device=None) -> int | None:
    """Run ``fn`` once, untimed (the warm-up: compiling, filling the page cache), and return
    the peak memory of ``device`` (default: JAX's first) while it ran above both what it was
    given and what it returns (for ``load``: the layout's scratch, not the loaded params);
    None where the device keeps no statistics (CPU). Polled by the layout bench's poller,
    and read exactly where ``fn`` sets the process's new peak (JAX's ``peak_bytes_in_use``
    cannot be reset): a layer's scratch may live for less than a poll. Measured here rather
    than in the timed runs: the poll takes the GIL from the loader's threads."""
    import jax

    from .layout import _Poller

    poller = _Poller(device if device is not None else jax.devices()[0])
    if not poller.ok:
        fn()
        return None
    before = int(poller.device.memory_stats().get("peak_bytes_in_use", 0))
    with poller:
        out = fn()
    stats = poller.device.memory_stats()  # (the result still held)
    end, after = int(stats["bytes_in_use"]), int(stats.get("peak_bytes_in_use", 0))
    del out
    return max(poller.peak, end, after if after > before else 0) - max(poller.base, end)


# step -> (label, what it is compared with)
STEPS = {"raw_read": ("raw read (one thread)", None), "safetensors_read": ("st read", None),
         "safetensors_read_write": ("st read+write", None),
         "load_raw": ("load(prepare=False)", "safetensors_read"),
         "load": ("load", "safetensors_read"),
         "load_host": ("load, layout on host", "safetensors_read"),
         "load_device": ("load, prepare_layer on device", "safetensors_read"),
         "convert": ("convert", "safetensors_read_write"),
         "convert_host": ("convert, layout on host", "safetensors_read_write"),
         "convert_device": ("convert, prepare_layer on device", "safetensors_read_write")}


def measure(path, *, repeats: int = 2, tmp=None, skip=(), layout="auto",
            cold: bool = False) -> dict:
    """Times (seconds, best of ``repeats``), GB/s, peak RSS and ratios for checkpoint ``path``.

    Returns ``{"bytes", "layer_bytes", "moe_layers", "shape", "steps": {step: {"s", "runs",
    "gb_per_s", "peak_rss_bytes", "peak_rss_layers", "peak_device_bytes",
    "peak_device_layers", "ratio"}}}``, steps as :data:`STEPS`
    (``ratio``: over the step it is compared with).
    """
    from .. import options as _options
    from ..checkpoint import convert as _convert
    from ..checkpoint.read import layer_index, open_checkpoint

    path = Path(path)
    with open_checkpoint(path) as ckpt:
        nbytes = sum(ckpt.nbytes(n) for n in ckpt.weight_map)
        per_layer: dict = {}
        for n in ckpt.weight_map:
            if (k := layer_index(n)) is not None:
                per_layer[k] = per_layer.get(k, 0) + ckpt.nbytes(n)
        layer_bytes = max(per_layer.values(), default=nbytes)
        shape = [{"prefix": x.prefix, "experts": x.spec.experts, "hidden": x.hidden,
                  "intermediate": x.intermediate, "gated": x.gated} for x in ckpt.moe]
    work = Path(tempfile.mkdtemp(prefix="bench-io-", dir=tmp))
    res = {"path": str(path), "bytes": nbytes, "layer_bytes": layer_bytes,
           "moe_layers": len(shape), "shape": shape[0] if shape else None,
           "repeats": repeats, "cache": "cold" if cold else "warm", "steps": {}}
    layouts = {"auto": [("", None)], "host": [("", True)], "device": [("", False)],
               "both": [("_host", True), ("_device", False)]}[layout]
    steps = res["steps"]

    def clean():
        for d in work.iterdir():
            shutil.rmtree(d)
        if cold:
            _evict(path)

    def timed(step, fn, before=clean if cold else None, device=None):
        t, runs, peak = _best(fn, repeats, before)
        steps[step] = {"s": t, "runs": runs, "gb_per_s": nbytes / t / 1e9,
                       "peak_rss_bytes": peak, "peak_rss_layers": peak / layer_bytes,
                       "peak_device_bytes": device,
                       "peak_device_layers": None if device is None else device / layer_bytes}

    try:
        # untimed: the page cache filled (every step below reads warm files), programs compiled
        _st_read(path)
        timed("raw_read", lambda: _raw_read(path))
        timed("safetensors_read", lambda: _st_read(path))
        timed("safetensors_read_write", lambda: _st_read_write(path, work / "st"), clean)
        if "load" not in skip:
            device = _device_peak(lambda: _load_params(path, prepare=False))
            timed("load_raw", lambda: _load_params(path, prepare=False), device=device)
        for suffix, host in layouts:
            with _options.override(host_layout=host):
                if "convert" not in skip:
                    clean()
                    device = _device_peak(lambda: _convert.convert(path, work / "warm",
                                                                   progress=False))
                    timed("convert" + suffix, lambda: _convert.convert(path, work / "dst",
                                                                       progress=False), clean,
                          device)
                clean()
                if "load" not in skip:
                    # (compiles prepare_layer for these shapes)
                    device = _device_peak(lambda: _load_params(path))
                    timed("load" + suffix, lambda: _load_params(path), device=device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for step, d in steps.items():
        base = STEPS[step][1]
        d["ratio"] = d["s"] / steps[base]["s"] if base in steps else None
    return res


def report(rows: list[tuple[str, dict]]) -> str:
    """One table: a line per checkpoint and step, then how time scales with E and layers."""
    lines = []
    for name, res in rows:
        s = res["shape"]
        lines.append(
            f"{name}: {res['bytes'] / 1e9:.3f} GB, {res['moe_layers']} MoE layers"
            + (f" (E={s['experts']}, H={s['hidden']}, I={s['intermediate']}"
               f"{'' if s['gated'] else ', not gated'})" if s else "")
            + f", largest layer {res['layer_bytes'] / 1e6:.1f} MB, best of {res['repeats']}, "
            f"{res['cache']} page cache")
        for step in (k for k in STEPS if k in res["steps"]):
            d, (label, base) = res["steps"][step], STEPS[step]
            ratio = (f"{d['ratio']:5.2f}x {STEPS[base][0]}" if d["ratio"] is not None
                     else "")
            per_layer = (f"{1e3 * d['s'] / res['moe_layers']:7.2f} ms a layer  "
                         if res["moe_layers"] else "")
            device = (f"device +{d['peak_device_layers']:5.2f} layers  "
                      if d.get("peak_device_layers") is not None else "")
            lines.append(f"  {label:<33} {d['s']:8.3f} s {d['gb_per_s']:6.2f} GB/s  "
                         f"{per_layer}peak RSS +{d['peak_rss_layers']:5.2f} layers  {device}"
                         f"{ratio}")
    lines += _scaling(rows)
    return "\n".join(lines)


def _scaling(rows) -> list[str]:
    """E=256 over E=16 (same bytes: 1.0 is flat), seconds per GB for 1, 2, 4 layers."""
    by = dict(rows)
    out = []
    if "E=256" in by and "E=16" in by:
        a, b = by["E=256"]["steps"], by["E=16"]["steps"]
        per = by["E=256"]["bytes"] / by["E=16"]["bytes"]  # (attention sized by H differs)
        out.append("E scaling at equal expert bytes, seconds per GB E=256 / E=16 (1.00: "
                   "flat): " + ", ".join(f"{STEPS[k][0]} {a[k]['s'] / b[k]['s'] / per:.2f}"
                                         for k in STEPS if k in a and k in b))
    layers = [by[k] for k in ("L=1", "L=2", "L=4") if k in by]
    if len(layers) > 1:
        out.append("layer scaling, seconds per GB at 1/2/4 layers: " + "; ".join(
            f"{STEPS[k][0]} " + "/".join(f"{r['steps'][k]['s'] * 1e9 / r['bytes']:.2f}"
                                         for r in layers)
            for k in STEPS if all(k in r["steps"] for r in layers)))
    return out


def _rows(args) -> list[tuple]:
    """The synthetic checkpoints to measure: ``(name, E, H, I, layers, naming)``."""
    if args.row:
        out = []
        for r in args.row:
            parts = r.split(",")
            try:
                e, h, i, layers = (int(x) for x in parts[:4])
            except ValueError:
                parts = []
            if len(parts) not in (4, 5):
                from ..errors import UserError
                raise UserError(f"--row {r!r}: expected E,H,I,LAYERS[,NAMING]")
            out.append((r, e, h, i, layers, parts[4] if len(parts) == 5 else "qwen3"))
        return out
    one = (args.experts, args.hidden, args.intermediate, args.layers)
    if any(x is not None for x in one):
        e, h, i, layers = (x if x is not None else d for x, d in zip(one, (128, 2048, 768, 2)))
        return [(f"E={e},H={h},I={i},L={layers}", e, h, i, layers, "qwen3")]
    return SUITE


def run(args) -> int:
    import jax

    from ..testing import write_checkpoint

    skip = {s for s in args.skip.split(",") if s}
    options = dict(repeats=args.repeats, tmp=args.tmp, skip=skip, layout=args.layout,
                   cold=args.cold)
    start, rows = time.perf_counter(), []
    if args.path:
        rows.append((args.path, measure(args.path, **options)))
    else:
        for name, e, h, i, layers, naming in _rows(args):
            tmp = Path(tempfile.mkdtemp(prefix="bench-io-ckpt-", dir=args.tmp))
            try:
                write_checkpoint(tmp, naming=naming, layers=layers, experts=e, hidden=h,
                                 intermediate=i, shards=args.shards, seed=0)
                rows.append((name, measure(tmp, **options)))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(report(rows[-1:]), file=sys.stderr, flush=True)
    out = {"device": str(jax.devices()[0]), "cpus": os.cpu_count(), "layout": args.layout,
           "seconds": time.perf_counter() - start, "rows": [dict(r, name=n) for n, r in rows]}
    print(f"bench-io on {out['device']} ({out['cpus']} CPUs), layout {args.layout}, "
          f"{out['seconds']:.0f} s in all")
    print(report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
