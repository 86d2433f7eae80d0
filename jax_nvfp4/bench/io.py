"""``python -m jax_nvfp4 bench-io``: load and convert against safetensors' own read of the shards.

On one checkpoint (``PATH``, or a synthetic one of the given shape written to a
temporary directory), in one run, after one untimed pass that fills the page cache
and compiles: the time safetensors itself needs to read every tensor of the shards
(``safe_open(..., framework="numpy").get_tensor``; float8, which numpy lacks,
through torch's reader, materialized), the same plus writing them back
(``safetensors.torch.save_file`` and fsync), the raw read of the files (one
thread, like ``cat``), ``load`` (MoE layers prepared, every
array ready on device; and with ``prepare=False``) and ``convert`` (written and fsynced). Ratios: load /
read, convert / (read + write). Each time is the best of ``--repeats``.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..checkpoint.convert import _fsync


def configure(p):
    p.add_argument("path", metavar="PATH", nargs="?",
                   help="checkpoint directory (default: a synthetic one, see the shape options)")
    p.add_argument("--experts", type=int, default=128, help="synthetic: experts E (128)")
    p.add_argument("--layers", type=int, default=2, help="synthetic: decoder layers (2)")
    p.add_argument("--hidden", type=int, default=2048, help="synthetic: hidden size H (2048)")
    p.add_argument("--intermediate", type=int, default=768,
                   help="synthetic: intermediate size I (768)")
    p.add_argument("--shards", type=int, default=3, help="synthetic: shard files (3)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each step (2)")
    p.add_argument("--tmp", default=None, help="where to write temporary checkpoints")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
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


def _load(path: Path, prepare=True):
    import jax

    from ..checkpoint.load import load
    params = load(path, prepare=prepare)
    jax.block_until_ready(params)
    return params


def _best(fn, repeats: int, before=None) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def measure(path, *, repeats: int = 2, tmp=None, skip=(), log=print) -> dict:
    """Times (seconds, best of ``repeats``), bytes and ratios for checkpoint ``path``."""
    from ..checkpoint import convert as _convert
    from ..checkpoint.read import open_checkpoint

    path = Path(path)
    with open_checkpoint(path) as ckpt:
        nbytes = sum(ckpt.nbytes(n) for n in ckpt.weight_map)
        shape = [{"prefix": x.prefix, "experts": x.spec.experts, "hidden": x.hidden,
                  "intermediate": x.intermediate} for x in ckpt.moe]
    work = Path(tempfile.mkdtemp(prefix="bench-io-", dir=tmp))
    res = {"path": str(path), "bytes": nbytes, "moe_layers": len(shape),
           "shape": shape[0] if shape else None, "repeats": repeats}
    try:
        def clean():
            for d in work.iterdir():
                shutil.rmtree(d)

        # untimed: the page cache filled (every step below reads warm files), programs compiled
        _st_read(path)
        res["raw_read_s"], res["raw_read_all_s"] = _best(lambda: _raw_read(path), repeats)
        res["safetensors_read_s"], res["safetensors_read_all_s"] = _best(
            lambda: _st_read(path), repeats)
        res["safetensors_read_write_s"], res["safetensors_read_write_all_s"] = _best(
            lambda: _st_read_write(path, work / "st"), repeats, clean)
        if "convert" not in skip:
            clean()
            _convert.convert(path, work / "warm", progress=False)
            res["convert_s"], res["convert_all_s"] = _best(
                lambda: _convert.convert(path, work / "dst", progress=False), repeats, clean)
        clean()
        if "load" not in skip:
            params = _load(path)  # compiles prepare_layer for these shapes
            del params
            res["load_s"], res["load_all_s"] = _best(lambda: _load(path), repeats)
            res["load_raw_s"], res["load_raw_all_s"] = _best(
                lambda: _load(path, prepare=False), repeats)
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r, rw = res["safetensors_read_s"], res["safetensors_read_write_s"]
    res["load_over_read"] = res["load_s"] / r if "load_s" in res else None
    res["load_over_raw_read"] = res["load_s"] / res["raw_read_s"] if "load_s" in res else None
    res["load_raw_over_read"] = res["load_raw_s"] / r if "load_s" in res else None
    res["convert_over_read_write"] = res["convert_s"] / rw if "convert_s" in res else None
    gbs = {k: nbytes / res[k] / 1e9 for k in
           ("raw_read_s", "safetensors_read_s", "safetensors_read_write_s", "load_s", "load_raw_s",
            "convert_s")
           if k in res}
    res["gb_per_s"] = gbs
    return res


def report(res: dict) -> str:
    gb = res["bytes"] / 1e9
    s = res["shape"]
    lines = [f"checkpoint {res['path']}: {gb:.3f} GB, {res['moe_layers']} MoE layers"
             + (f" (E={s['experts']}, H={s['hidden']}, I={s['intermediate']})" if s else "")
             + f", best of {res['repeats']}"]

    def row(name, key, extra=""):
        if key in res:
            lines.append(f"  {name:<28} {res[key]:8.3f} s  {res['gb_per_s'][key]:6.2f} GB/s"
                         f"  (runs: {', '.join(f'{t:.3f}' for t in res[key[:-2] + '_all_s'])})"
                         + extra)
    row("raw read (one thread)", "raw_read_s")
    row("safetensors read", "safetensors_read_s")
    row("safetensors read + write", "safetensors_read_write_s")
    row("load (prepared, on device)", "load_s",
        f"  = {res['load_over_read']:.2f}x read ({res['load_over_raw_read']:.2f}x raw)"
        if res.get("load_over_read") else "")
    row("load (prepare=False)", "load_raw_s",
        f"  = {res['load_raw_over_read']:.2f}x read" if res.get("load_raw_over_read") else "")
    row("convert (written, fsynced)", "convert_s",
        f"  = {res['convert_over_read_write']:.2f}x read+write"
        if res.get("convert_over_read_write") else "")
    lines.append(f"  peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def run(args) -> int:
    import jax

    from ..testing import write_checkpoint

    skip = {s for s in args.skip.split(",") if s}
    tmp = Path(tempfile.mkdtemp(prefix="bench-io-ckpt-", dir=args.tmp)) if not args.path else None
    try:
        if tmp is not None:
            t = time.perf_counter()
            write_checkpoint(tmp, layers=args.layers, experts=args.experts, hidden=args.hidden,
                             intermediate=args.intermediate, shards=args.shards, seed=0)
            print(f"wrote a synthetic checkpoint in {time.perf_counter() - t:.1f} s",
                  file=sys.stderr)
        res = measure(args.path or tmp, repeats=args.repeats, tmp=args.tmp, skip=skip)
        res["device"] = str(jax.devices()[0])
        print(report(res))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
