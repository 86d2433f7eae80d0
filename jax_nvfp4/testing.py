"""Synthetic NVFP4 MoE data for tests, examples and benchmarks (no downloads)."""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext

import jax
import jax.numpy as jnp
import numpy as np

from .layout.spec import SCALE_DTYPE, LayerSpec


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
        out = [_random_bytes(k, s) for k, s in zip(keys, spec.shapes(padded=False))]
        out[1], out[3] = (jax.lax.bitcast_convert_type(x, SCALE_DTYPE) for x in (out[1], out[3]))
    return out


def _random_bytes(key, shape) -> jax.Array:
    # Drawn as uint32 words and viewed as bytes: jax.random.bits(uint8) builds uint32
    # intermediates of 4x the result (21 GiB for Kimi-K2's w13: out of memory on an H200).
    if shape[-1] % 4:
        return jax.random.bits(key, shape, jnp.uint8)
    words = jax.random.bits(key, (*shape[:-1], shape[-1] // 4), jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(shape)


def random_block_scales(rng: np.random.Generator, shape) -> np.ndarray:
    """Realistic float8_e4m3fn block scales: positive, finite (no NaN), as ModelOpt makes them.

    ModelOpt's block scale is ``448 * amax(block) / amax(tensor)`` rounded to e4m3; the
    ratio is drawn uniformly in ``[1/64, 1]``, so values lie in ``[7, 448]``.
    """
    import ml_dtypes

    return (rng.uniform(1 / 64, 1, size=shape) * 448).astype(ml_dtypes.float8_e4m3fn)


# Synthetic checkpoint families: real tensor names and config fields of each.
#   layer: the decoder layer's prefix; moe: the MoE module under it (its experts are
#   "{layer}.{moe}.experts"; "" when the experts sit on the layer, as Gemma-4's);
#   naming: the expert naming (jax_nvfp4._checkpoint.NAMINGS); router: the router weight.
def _family(naming: str, model_type: str, arch: str, *, moe: str = "mlp",
            layer: str = "model.layers.{L}", router: str | None = None) -> dict:
    return dict(layer=layer, moe=moe, naming=naming, router=router or f"{moe}.gate.weight",
                model_type=model_type, arch=arch)


FAMILIES = {
    "qwen3": _family("qwen3", "qwen3_moe", "Qwen3MoeForCausalLM"),
    "mixtral": _family("mixtral", "mixtral", "MixtralForCausalLM", moe="block_sparse_moe"),
    # MiniMax-M2: Mixtral's names (w1 gate, w3 up, w2 down), float32 router and routing bias
    "minimax_m2": _family("mixtral", "minimax_m2", "MiniMaxM2ForCausalLM",
                          moe="block_sparse_moe"),
    # Nemotron-3-Nano (NemotronHForCausalLM): "backbone.", the MoE is the layer's "mixer",
    # non-gated ReLU^2 experts with up_proj and down_proj only
    "nemotron_h": _family("nemotron_h", "nemotron_h", "NemotronHForCausalLM",
                          layer="backbone.layers.{L}", moe="mixer"),
    # Gemma-4 MoE (Gemma4ForConditionalGeneration): the experts and the router sit on the
    # decoder layer, next to a dense mlp; sizes in config.json's text_config
    "gemma4": _family("qwen3", "gemma4", "Gemma4ForConditionalGeneration",
                      layer="model.language_model.layers.{L}", moe="",
                      router="router.proj.weight"),
    # fused gate/up, rows [gate; up]: per expert (experts.{e}.gate_up_proj) or stacked
    # (experts.gate_up_proj [E, 2I, H/2], as vLLM's fused-expert loader takes it)
    "gate_up": _family("gate_up", "qwen3_moe", "Qwen3MoeForCausalLM"),
    "gate_up_stacked": _family("gate_up_stacked", "qwen3_moe", "Qwen3MoeForCausalLM"),
}


def experts_prefix(naming: str, layer: int) -> str:
    """Where :func:`write_checkpoint`'s ``naming`` puts layer ``layer``'s experts."""
    f = FAMILIES[naming]
    base = f["layer"].format(L=layer)
    return f"{base}.{f['moe']}.experts" if f["moe"] else f"{base}.experts"


def write_checkpoint(path, *, naming: str = "qwen3", layers: int = 2, experts: int = 4,
                     hidden: int = 256, intermediate: int = 64, shards: int = 3,
                     seed: int | None = None, quant_algo: str = "NVFP4",
                     split_gate_up: bool = False) -> dict[str, np.ndarray]:
    """Write a small synthetic ModelOpt NVFP4 MoE checkpoint (random values, never all zeros).

    The directory ``path`` gets ``config.json`` (``quantization_config``: quant_method
    "modelopt", ``quant_algo``, group_size 16), ``hf_quant_config.json``,
    ``model.safetensors.index.json`` and ``shards`` safetensors files. Tensors use the
    real names and dtypes of the family ``naming`` (a key of :data:`FAMILIES`):

    ``"qwen3"``
        ``model.layers.{L}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}`` (Qwen3-MoE),
        with an NVFP4 shared expert;
    ``"mixtral"``, ``"minimax_m2"``
        ``model.layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}`` (MiniMax-M2 adds its
        float32 router and ``e_score_correction_bias``);
    ``"nemotron_h"``
        ``backbone.layers.{L}.mixer.experts.{e}.{up_proj,down_proj}``: Nemotron-3-Nano's
        non-gated ReLU^2 experts (config ``n_routed_experts``, ``moe_intermediate_size``,
        ``mlp_hidden_act: relu2``), NVFP4 shared experts;
    ``"gemma4"``
        ``model.language_model.layers.{L}.experts.{e}.{gate_proj,up_proj,down_proj}``,
        router ``...layers.{L}.router.proj.weight`` (sizes in ``text_config``);
    ``"gate_up"``
        fused ``model.layers.{L}.mlp.experts.{e}.gate_up_proj`` ``[2I, H/2]``, rows
        ``[gate; up]``, one ``weight_scale_2`` and ``input_scale`` for both;
    ``"gate_up_stacked"``
        ``model.layers.{L}.mlp.experts.gate_up_proj`` ``[E, 2I, H/2]`` (rows ``[gate;
        up]``) and ``experts.down_proj`` ``[E, H, I/2]`` with ``_weight_scale``
        (per block), ``_weight_scale_2`` ``[E]`` and ``_input_scale`` (one, ``[]``).

    Per projection: ``.weight`` uint8 ``[rows, cols/2]``, ``.weight_scale`` F8_E4M3
    ``[rows, cols/16]``, ``.weight_scale_2`` and ``.input_scale`` float32 scalars.
    Tensors are dealt to the shards in turn, so one expert's tensors sit in different
    shards. Non-MoE tensors (embeddings, attention, norms, router) are included. Sizes
    are not validated, so bad checkpoints can be made too.

    ``quant_algo="MIXED_PRECISION"``: ModelOpt's per-module table ``quantized_layers``
    (in both configs) marks every expert projection (and shared expert) NVFP4 and the
    attention projections FP8, which are then written as FP8 (F8_E4M3 weight, float32
    ``weight_scale`` and ``input_scale``).

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

    from .checkpoint.read import INDEX, NAMINGS

    if naming not in FAMILIES:
        raise ValueError(f"naming must be one of {sorted(FAMILIES)}, got {naming!r}")
    fam = FAMILIES[naming]
    mixed = quant_algo == "MIXED_PRECISION"
    rng = np.random.default_rng(seed)
    h, i, vocab = hidden, intermediate, 64
    table: dict = {}  # MIXED_PRECISION: module -> its quantization

    def u8(*shape):
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    def bf16(*shape):
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)

    def scalar(low, high):
        return rng.uniform(low, high, ()).astype(np.float32)

    def nvfp4(prefix, rows, cols, *, weight_scale_2=None, input_scale=None):
        table[prefix] = {"quant_algo": "NVFP4", "group_size": 16}
        return {f"{prefix}.weight": u8(rows, cols // 2),
                f"{prefix}.weight_scale": random_block_scales(rng, (rows, cols // 16)),
                f"{prefix}.weight_scale_2": (scalar(1e-4, 1e-2) if weight_scale_2 is None
                                             else weight_scale_2),
                f"{prefix}.input_scale": scalar(1e-3, 1e-1) if input_scale is None else input_scale}

    def linear(prefix, rows, cols):
        if not mixed:
            return {f"{prefix}.weight": bf16(rows, cols)}
        table[prefix] = {"quant_algo": "FP8"}
        return {f"{prefix}.weight": rng.uniform(-448, 448, (rows, cols)).astype(
                    ml_dtypes.float8_e4m3fn),
                f"{prefix}.weight_scale": scalar(1e-4, 1e-2),
                f"{prefix}.input_scale": scalar(1e-3, 1e-1)}

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

    gate, up, down = NAMINGS[fam["naming"]]
    tensors = {}
    emb = {"nemotron_h": "backbone.embeddings.weight",
           "gemma4": "model.language_model.embed_tokens.weight"}
    tensors[emb.get(naming, "model.embed_tokens.weight")] = bf16(vocab, h)
    for layer in range(layers):
        p = fam["layer"].format(L=layer)
        moe = f"{p}.{fam['moe']}" if fam["moe"] else p
        x = experts_prefix(naming, layer)
        tensors[f"{p}.input_layernorm.weight" if naming != "nemotron_h" else f"{p}.norm.weight"] \
            = bf16(h)
        if naming != "nemotron_h":  # Nemotron-H's attention sits in layers of its own
            tensors.update(linear(f"{p}.self_attn.q_proj", h, h))
            tensors.update(linear(f"{p}.self_attn.o_proj", h, h))
        if naming in ("minimax_m2",):  # float32 router, as MiniMax-M2 ships it
            tensors[f"{p}.{fam['router']}"] = rng.standard_normal((experts, h)).astype(np.float32)
            tensors[f"{moe}.e_score_correction_bias"] = rng.standard_normal(experts).astype(
                np.float32)
        else:
            tensors[f"{p}.{fam['router']}"] = bf16(experts, h)  # the router
        if naming == "nemotron_h":
            tensors[f"{moe}.gate.e_score_correction_bias"] = rng.standard_normal(
                experts).astype(np.float32)
        if naming == "gemma4":
            tensors[f"{p}.router.scale"] = bf16(h)
            tensors[f"{p}.router.per_expert_scale"] = bf16(experts)
            for proj, (r, c) in (("gate_proj", (2 * i, h)), ("up_proj", (2 * i, h)),
                                 ("down_proj", (h, 2 * i))):  # the dense MLP beside the MoE
                tensors[f"{p}.mlp.{proj}.weight"] = bf16(r, c)
        if naming == "gate_up_stacked":
            table[x] = {"quant_algo": "NVFP4", "group_size": 16}
            tensors[f"{x}.gate_up_proj"] = u8(experts, 2 * i, h // 2)
            tensors[f"{x}.gate_up_proj_weight_scale"] = random_block_scales(
                rng, (experts, 2 * i, h // 16))
            tensors[f"{x}.gate_up_proj_weight_scale_2"] = rng.uniform(
                1e-4, 1e-2, experts).astype(np.float32)
            tensors[f"{x}.gate_up_proj_input_scale"] = scalar(1e-3, 1e-1)
            tensors[f"{x}.down_proj"] = u8(experts, h, i // 2)
            tensors[f"{x}.down_proj_weight_scale"] = random_block_scales(
                rng, (experts, h, i // 16))
            tensors[f"{x}.down_proj_weight_scale_2"] = rng.uniform(
                1e-4, 1e-2, experts).astype(np.float32)
            tensors[f"{x}.down_proj_input_scale"] = scalar(1e-3, 1e-1)
        else:
            for e in range(experts):
                if naming == "gate_up":
                    tensors.update(nvfp4(f"{x}.{e}.gate_up_proj", 2 * i, h))
                elif gate is None:
                    tensors.update(nvfp4(f"{x}.{e}.{up}", i, h))
                else:
                    tensors.update(gate_up(f"{x}.{e}", gate, up, i, h))
                tensors.update(nvfp4(f"{x}.{e}.{down}", h, i))
        if naming == "qwen3":
            tensors.update(gate_up(f"{p}.mlp.shared_expert", "gate_proj", "up_proj", i, h))
            tensors.update(nvfp4(f"{p}.mlp.shared_expert.down_proj", h, i))
            tensors[f"{p}.mlp.shared_expert_gate.weight"] = bf16(1, h)
        if naming == "nemotron_h":
            tensors.update(nvfp4(f"{moe}.shared_experts.up_proj", 2 * i, h))
            tensors.update(nvfp4(f"{moe}.shared_experts.down_proj", h, 2 * i))
    if naming == "nemotron_h":
        tensors["backbone.norm_f.weight"] = bf16(h)
    else:
        tensors[("model.language_model." if naming == "gemma4" else "model.")
                + "norm.weight"] = bf16(h)
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
    if mixed:
        quant = {"quant_algo": quant_algo, "kv_cache_quant_algo": "FP8",
                 "exclude_modules": ["lm_head"], "quantized_layers": table}
    sizes = {
        "qwen3_moe": {"num_experts": experts, "moe_intermediate_size": i,
                      "num_experts_per_tok": min(2, experts)},
        "mixtral": {"num_local_experts": experts, "intermediate_size": i,
                    "num_experts_per_tok": min(2, experts)},
        "minimax_m2": {"num_local_experts": experts, "intermediate_size": i,
                       "num_experts_per_tok": min(2, experts), "scoring_func": "sigmoid",
                       "use_routing_bias": True},
        "nemotron_h": {"n_routed_experts": experts, "moe_intermediate_size": i,
                       "num_experts_per_tok": min(2, experts), "mlp_hidden_act": "relu2",
                       "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 2 * i,
                       "hybrid_override_pattern": "E" * layers},
    }
    config = {"architectures": [fam["arch"]], "model_type": fam["model_type"]}
    text = {"hidden_size": h, "num_hidden_layers": layers, "vocab_size": vocab}
    if naming == "gemma4":
        config["text_config"] = {"model_type": "gemma4_text", **text, "enable_moe_block": True,
                                 "num_experts": experts, "top_k_experts": min(2, experts),
                                 "moe_intermediate_size": i, "intermediate_size": 2 * i,
                                 "hidden_activation": "gelu_pytorch_tanh"}
    else:
        config.update(sizes[fam["model_type"]], **text)
        if naming != "nemotron_h":
            config["hidden_act"] = "silu"
    config.update({"torch_dtype": "bfloat16",
                   "quantization_config": {"quant_method": "modelopt", **quant}})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.29.0"}, "quantization": quant}, indent=2))
    return tensors
