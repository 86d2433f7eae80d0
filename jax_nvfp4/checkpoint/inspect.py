"""``python -m jax_nvfp4 inspect PATH``: what a checkpoint holds.

Headers only, plus each MoE layer's per-expert scalars (a few bytes an expert), to
show the activation maxima ``a1``, ``a2`` the kernel's scalars are built from and
whether gate and up ``weight_scale_2`` differ (see :func:`jax_nvfp4.kernel_scales`).
"""

from __future__ import annotations

import numpy as np

from .read import FAMILIES, CheckpointError, _config_count, _ranges, open_checkpoint


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
            f"  quantization: {_quant(ckpt.quant)}",
            f"  family: {_family(ckpt)}",
            f"  naming: {naming}",
            f"  shards: {len(ckpt.shards)}, tensors: {len(ckpt.weight_map)}, "
            f"{nbytes / 2**20:,.1f} MiB",
            f"  MoE layers: {len(ckpt.moe)}",
        ]
        shapes: dict = {}
        for layer in ckpt.moe:
            key = (layer.spec.experts, layer.hidden, layer.padded_hidden, layer.intermediate,
                   layer.padded_intermediate, layer.gated)
            shapes.setdefault(key, []).append(layer.layer)
        for (e, h, hp, i, ip, gated), idx in shapes.items():
            hpad = f" (padded to {hp})" if hp != h else ""
            ipad = f" (padded to {ip})" if ip != i else ""
            where = _ranges(sorted(x for x in idx if x is not None))
            lines.append(f"    layers {where}: experts E={e}, hidden H={h}{hpad}, "
                         f"intermediate I={i}{ipad}, "
                         + ("gated (w13 = [up; gate])" if gated
                            else "not gated (ReLU^2: w13 = up only)"))
        if ckpt.moe:
            lines.append("  scales (a1, a2: max w13 / w2 input_scale over the experts):")
        for layer in ckpt.moe:
            lines.append(f"    {layer.prefix}: {_scales(ckpt, layer)}")
        lines.append(f"  other tensors: {len(ckpt.other)}")
    return "\n".join(lines)


def _quant(q: dict) -> str:
    if q.get("quant_algo") == "MIXED_PRECISION":
        algos = sorted({str(v.get("quant_algo")) for v in q["quantized_layers"].values()
                        if isinstance(v, dict)})
        return (f"MIXED_PRECISION ({len(q['quantized_layers'])} modules in quantized_layers: "
                f"{', '.join(algos)}; MoE experts NVFP4, group size 16)")
    return f"{q.get('quant_algo')}, group size {q.get('group_size', 16)}"


def _family(ckpt) -> str:
    """The model family from config.json (``model_type``) and its stated expert count."""
    t = ckpt.family
    out = f"{FAMILIES.get(t, t)} (model_type {t!r})" if t else "unknown (no config.json model_type)"
    field, n = _config_count(ckpt.config)
    out += f", config {field} = {n}" if field else ""
    text = ckpt.config.get("text_config")
    for c in (ckpt.config, text if isinstance(text, dict) else {}):
        for key in ("mlp_hidden_act", "hidden_activation", "hidden_act"):  # the experts' act
            if isinstance(c.get(key), str):
                return out + f", activation {c[key]} ({key})"
    return out


def _scales(ckpt, layer) -> str:
    try:
        s = ckpt.scales(layer)
    except CheckpointError as e:
        return f"broken: {e}"
    ws2 = s["w13_weight_scale_2"]
    if ws2.ndim == 1:
        gate_up = "not gated (up weight_scale_2 only)"
    else:
        differ = int((ws2[:, 0] != ws2[:, 1]).sum())
        gate_up = (f"gate/up weight_scale_2 differ in {differ} of {len(ws2)} experts" if differ
                   else "gate/up weight_scale_2 equal")
    out = (f"a1={np.max(s['w13_input_scale']):.6g}, a2={np.max(s['w2_input_scale']):.6g}, "
           f"{gate_up}")
    if layer.prepared and not layer.kernel_stored:
        out += " (kernel scalars not stored: computed on load)"
    return out


def run(args) -> int:
    print(describe(args.path))
    return 0
