"""Synthetic NVFP4 MoE data for tests, examples and benchmarks (no downloads)."""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext

import jax
import jax.numpy as jnp
import numpy as np

from ._spec import SCALE_DTYPE, LayerSpec


def random_layer(rng: np.random.Generator, experts: int, hidden: int, intermediate: int, *,
                 gated: bool = True) -> list[np.ndarray]:
    """Random bytes shaped like one MoE layer in the checkpoint layout.

    Returns numpy uint8 ``[w13_weight, w13_weight_scale, w2_weight, w2_weight_scale]``
    with shapes ``[E, R1, H/2]``, ``[E, R1, H/16]``, ``[E, H, I/2]``, ``[E, H, I/16]``
    (``R1 = 2I`` when gated). Scale bytes are arbitrary float8_e4m3fn bit patterns;
    view them with ``.view(ml_dtypes.float8_e4m3fn)``.
    """
    spec = LayerSpec(experts, hidden, intermediate, gated)
    return [rng.integers(0, 256, size=s, dtype=np.uint8) for s in spec.shapes(padded=False)]


def random_device_layer(key, experts: int, hidden: int, intermediate: int, *,
                        gated: bool = True, device=None) -> list[jax.Array]:
    """Random bytes shaped like one MoE layer, drawn on the device (no host copy).

    Returns jax arrays ``[w13_weight, w13_weight_scale, w2_weight, w2_weight_scale]``
    as :func:`random_layer` shapes them, weights uint8 and scales float8_e4m3fn (any bit
    pattern), on ``device`` (default: JAX's default device). For layers too large to
    build on the host, e.g. a DeepSeek-V3 layer of 5.9 GiB.
    """
    spec = LayerSpec(experts, hidden, intermediate, gated)
    with jax.default_device(device) if device is not None else _nullcontext():
        keys = jax.random.split(key, 4)
        out = [jax.random.bits(k, s, jnp.uint8) for k, s in zip(keys, spec.shapes(padded=False))]
        out[1], out[3] = (jax.lax.bitcast_convert_type(x, SCALE_DTYPE) for x in (out[1], out[3]))
    return out


def random_block_scales(rng: np.random.Generator, shape) -> np.ndarray:
    """Realistic float8_e4m3fn block scales: positive, finite (no NaN), as ModelOpt makes them.

    ModelOpt's block scale is ``448 * amax(block) / amax(tensor)`` rounded to e4m3; the
    ratio is drawn uniformly in ``[1/64, 1]``, so values lie in ``[7, 448]``.
    """
    import ml_dtypes

    return (rng.uniform(1 / 64, 1, size=shape) * 448).astype(ml_dtypes.float8_e4m3fn)


def write_checkpoint(path, *, naming: str = "qwen3", layers: int = 2, experts: int = 4,
                     hidden: int = 256, intermediate: int = 64, shards: int = 3,
                     seed: int | None = None, quant_algo: str = "NVFP4",
                     split_gate_up: bool = False) -> dict[str, np.ndarray]:
    """Write a small synthetic ModelOpt NVFP4 MoE checkpoint (random values, never all zeros).

    The directory ``path`` gets ``config.json`` (``quantization_config``: quant_method
    "modelopt", ``quant_algo``, group_size 16), ``hf_quant_config.json``,
    ``model.safetensors.index.json`` and ``shards`` safetensors files. Tensors use the
    real names and dtypes: per expert ``e`` of layer ``L`` and projection ``p``,
    ``model.layers.{L}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}`` (``naming="qwen3"``)
    or ``model.layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}`` (``"mixtral"``) with
    ``.weight`` uint8 ``[rows, cols/2]``, ``.weight_scale`` F8_E4M3 ``[rows, cols/16]``,
    ``.weight_scale_2`` and ``.input_scale`` float32 scalars. Tensors are dealt to the
    shards in turn, so one expert's tensors sit in different shards. Non-MoE tensors
    (embeddings, attention, norms, router; with ``"qwen3"`` an NVFP4 shared expert) are
    included. Sizes are not validated, so bad checkpoints can be made too.

    Values are realistic, so a forward on them is finite: weights are random bytes (every
    e2m1 code is finite), block scales come from :func:`random_block_scales`,
    ``weight_scale_2`` is drawn in ``[1e-4, 1e-2]`` and ``input_scale`` in
    ``[1e-3, 1e-1]``, per expert and projection. As ModelOpt exports MoE experts, an
    expert's gate and up projections share their ``weight_scale_2`` and ``input_scale``
    (they see the same input); with ``split_gate_up=True`` their ``weight_scale_2``
    differ (in every expert), as in checkpoints quantized without that synchronisation.

    Returns every tensor written, by name (float8 as ``ml_dtypes.float8_e4m3fn``).
    """
    import json
    from pathlib import Path

    import ml_dtypes
    from safetensors.numpy import save_file

    from ._checkpoint import INDEX, NAMINGS

    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {sorted(NAMINGS)}, got {naming!r}")
    rng = np.random.default_rng(seed)
    h, i, vocab = hidden, intermediate, 64

    def u8(*shape):
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    def bf16(*shape):
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)

    def scalar(low, high):
        return rng.uniform(low, high, ()).astype(np.float32)

    def nvfp4(prefix, rows, cols, *, weight_scale_2=None, input_scale=None):
        return {f"{prefix}.weight": u8(rows, cols // 2),
                f"{prefix}.weight_scale": random_block_scales(rng, (rows, cols // 16)),
                f"{prefix}.weight_scale_2": (scalar(1e-4, 1e-2) if weight_scale_2 is None
                                             else weight_scale_2),
                f"{prefix}.input_scale": scalar(1e-3, 1e-1) if input_scale is None else input_scale}

    def gate_up(prefix, proj_gate, proj_up, rows, cols):
        g = nvfp4(f"{prefix}.{proj_gate}", rows, cols)
        ws2 = g[f"{prefix}.{proj_gate}.weight_scale_2"]
        if split_gate_up:
            while (other := scalar(1e-4, 1e-2)) == ws2:
                pass
            ws2 = other
        u = nvfp4(f"{prefix}.{proj_up}", rows, cols, weight_scale_2=ws2.copy(),
                  input_scale=g[f"{prefix}.{proj_gate}.input_scale"].copy())
        return {**g, **u}

    gate, up, down = NAMINGS[naming]
    moe = "mlp" if naming == "qwen3" else "block_sparse_moe"
    tensors = {"model.embed_tokens.weight": bf16(vocab, h)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = bf16(h)
        tensors[f"{p}.self_attn.q_proj.weight"] = bf16(h, h)
        tensors[f"{p}.self_attn.o_proj.weight"] = bf16(h, h)
        tensors[f"{p}.{moe}.gate.weight"] = bf16(experts, h)  # the router
        for e in range(experts):
            x = f"{p}.{moe}.experts.{e}"
            tensors.update(gate_up(x, gate, up, i, h))
            tensors.update(nvfp4(f"{x}.{down}", h, i))
        if naming == "qwen3":
            tensors.update(gate_up(f"{p}.mlp.shared_expert", "gate_proj", "up_proj", i, h))
            tensors.update(nvfp4(f"{p}.mlp.shared_expert.down_proj", h, i))
            tensors[f"{p}.mlp.shared_expert_gate.weight"] = bf16(1, h)
    tensors["model.norm.weight"] = bf16(h)
    tensors["lm_head.weight"] = bf16(vocab, h)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {name: files[k % shards] for k, name in enumerate(tensors)}
    for file in files:
        save_file({n: x for n, x in tensors.items() if weight_map[n] == file}, path / file,
                  metadata={"format": "pt"})
    total = sum(x.nbytes for x in tensors.values())
    (path / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    quant = {"quant_algo": quant_algo, "kv_cache_quant_algo": None, "group_size": 16,
             "exclude_modules": ["lm_head"]}
    arch, sizes = (("Qwen3MoeForCausalLM", {"model_type": "qwen3_moe", "num_experts": experts,
                                             "moe_intermediate_size": i})
                   if naming == "qwen3" else
                   ("MixtralForCausalLM", {"model_type": "mixtral", "num_local_experts": experts,
                                           "intermediate_size": i}))
    config = {"architectures": [arch], **sizes, "hidden_size": h, "num_hidden_layers": layers,
              "vocab_size": vocab, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "modelopt", **quant}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.29.0"}, "quantization": quant}, indent=2))
    return tensors
