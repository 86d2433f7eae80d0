"""``python -m jax_nvfp4 convert SRC DST``: a prepared checkpoint, one decoder layer at a time.

Each decoder layer becomes one output shard: its MoE layers loaded and
prepared on the default device by the loader's machinery, its other tensors
copied unchanged. The host holds one layer's output at a time. Everything is
written into a temporary sibling of DST that is renamed at the end, so a
failed or interrupted conversion leaves no DST.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from . import __version__
from ._checkpoint import FORMAT, INDEX, LAYOUT, PREPARED_JSON, SINGLE, open_checkpoint
from ._cli import UserError
from ._load import load_layer


def configure(p):
    p.add_argument("src", metavar="SRC", help="ModelOpt NVFP4 checkpoint directory")
    p.add_argument("dst", metavar="DST", help="directory to write the prepared checkpoint to")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _replace(tmp: Path, dst: Path):
    """Rename ``tmp`` to ``dst``; an existing ``dst`` is moved aside first, then removed."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.rename(dst, old / dst.name)
    os.rename(tmp, dst)
    shutil.rmtree(old)


def convert(src, dst, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert checkpoint ``src`` to a prepared checkpoint at ``dst``; returns a summary dict.

    The output holds, per MoE layer ``prefix`` (e.g. ``model.layers.3.mlp.experts``),
    ``{prefix}.w13_weight``, ``.w13_weight_scale``, ``.w2_weight``, ``.w2_weight_scale``
    (exactly :func:`prepare_layer`'s outputs), float32 ``.w13_weight_scale_2`` and
    ``.w13_input_scale`` ``[E, 2]`` (gate, up), ``.w2_weight_scale_2`` and
    ``.w2_input_scale`` ``[E]``; other tensors unchanged; the index rewritten; the
    other files of ``src`` copied; and ``jax_nvfp4.json`` recording the layout.
    """
    from tqdm import tqdm  # noqa: PLC0415  (only the CLI needs it)

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} exists; pass --overwrite to replace it")
    if src.resolve() == dst.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"{dst} would overwrite or sit inside the source {src}")
    if dst.resolve() in src.resolve().parents:  # replacing DST would delete SRC
        raise UserError(f"the source {src} sits inside {dst}; choose another destination")
    start = time.perf_counter()
    with open_checkpoint(src) as ckpt:
        if ckpt.prepared:
            raise UserError(f"{src} is already prepared (see its {PREPARED_JSON})")
        groups = ckpt.groups()
        total = sum(ckpt.nbytes(n) for n in ckpt.weight_map)
        metadata = {"jax_nvfp4.format": FORMAT, "jax_nvfp4.layout": LAYOUT,
                    "jax_nvfp4.version": __version__, "jax_nvfp4.source": str(src.resolve())}
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
            weight_map, written = {}, 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc="convert", disable=not progress) as bar:
                for k, (_, moe, names) in enumerate(groups):
                    file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
                    tensors = {}
                    for name in names:
                        tensors[name] = ckpt.read(name)
                        bar.update(tensors[name].nbytes)
                    for layer in moe:
                        arrays = load_layer(ckpt, layer, prepare=True, progress=bar.update)
                        tensors.update((f"{layer.prefix}.{n}", np.asarray(x))
                                       for n, x in arrays.items())
                        del arrays
                    _save(tensors, tmp / file, metadata)
                    weight_map.update(dict.fromkeys(tensors, file))
                    written += sum(x.nbytes for x in tensors.values())
                    del tensors
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": written}, "weight_map": weight_map}, indent=2))
            layers = {x.prefix: {"experts": x.spec.experts, "hidden": x.spec.hidden,
                                 "intermediate": x.intermediate,
                                 "padded_intermediate": x.spec.padded_i} for x in ckpt.moe}
            (tmp / PREPARED_JSON).write_text(json.dumps(
                {"format": FORMAT, "layout": LAYOUT, "jax_nvfp4_version": __version__,
                 "source": str(src.resolve()), "naming": ckpt.naming, "gated": True,
                 "moe_layers": layers}, indent=2))
            for f in src.iterdir():  # config, tokenizer, ... (the shards were rewritten)
                if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, SINGLE):
                    shutil.copy2(f, tmp / f.name)
            _replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    stats = jax.devices()[0].memory_stats() or {}
    return {"src": src, "dst": dst, "naming": ckpt.naming, "moe_layers": len(ckpt.moe),
            "experts": sum(x.spec.experts for x in ckpt.moe), "shards": len(groups),
            "bytes_read": total, "bytes_written": written, "seconds": time.perf_counter() - start,
            "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_bytes": stats.get("peak_bytes_in_use")}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save(tensors: dict, path: Path, metadata: dict):
    from safetensors.numpy import save_file  # noqa: PLC0415
    save_file({n: np.asarray(x, order="C") for n, x in tensors.items()}, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600; make it like the copied files


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def run(args) -> int:
    s = convert(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet)
    t = s["seconds"]
    print(f"converted {s['src']} -> {s['dst']} ({s['naming']} naming)")
    print(f"  MoE layers: {s['moe_layers']}, experts: {s['experts']}, shards: {s['shards']}")
    print(f"  bytes: {_mib(s['bytes_read'])} read, {_mib(s['bytes_written'])} written "
          f"in {t:.2f} s ({s['bytes_read'] / max(t, 1e-9) / 2**20:,.1f} MiB/s)")
    print(f"  peak memory: host {_mib(s['peak_host_bytes'])} (RSS), "
          f"device {_mib(s['peak_device_bytes'])}")
    return 0
