"""``python -m jax_nvfp4 inspect PATH``: what a checkpoint holds (headers only, no tensor data)."""

from __future__ import annotations

from ._checkpoint import _ranges, open_checkpoint


def configure(p):
    p.add_argument("path", metavar="PATH",
                   help="checkpoint directory (ModelOpt NVFP4 or prepared)")


def describe(path) -> str:
    with open_checkpoint(path) as ckpt:
        info = ckpt.prepared_info or {}
        naming = ckpt.naming or info.get("naming")
        nbytes = sum(ckpt.nbytes(n) for n in ckpt.weight_map)
        prepared = (f"yes (by jax_nvfp4 {info.get('jax_nvfp4_version')}, layout "
                    f"{info.get('layout')}, from {info.get('source')})" if ckpt.prepared else "no")
        lines = [
            f"checkpoint: {path}",
            f"  prepared: {prepared}",
            f"  quantization: {ckpt.quant.get('quant_algo')}, "
            f"group size {ckpt.quant.get('group_size', 16)}",
            f"  naming: {naming}",
            f"  shards: {len(ckpt.shards)}, tensors: {len(ckpt.weight_map)}, "
            f"{nbytes / 2**20:,.1f} MiB",
            f"  MoE layers: {len(ckpt.moe)}",
        ]
        shapes: dict = {}
        for layer in ckpt.moe:
            s = layer.spec
            key = (s.experts, s.hidden, layer.intermediate, s.padded_i)
            shapes.setdefault(key, []).append(layer.layer)
        for (e, h, i, ip), idx in shapes.items():
            pad = f" (padded to {ip})" if ip != i else ""
            where = _ranges(sorted(x for x in idx if x is not None))
            lines.append(f"    layers {where}: experts E={e}, hidden H={h}, "
                         f"intermediate I={i}{pad}")
        lines.append(f"  other tensors: {len(ckpt.other)}")
    return "\n".join(lines)


def run(args) -> int:
    print(describe(args.path))
    return 0
