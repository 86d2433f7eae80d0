"""Helpers for the checkpoint tests: stacking a synthetic checkpoint's experts, editing shards."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jax_nvfp4 import options
from jax_nvfp4.checkpoint.read import INDEX, NAMINGS
from jax_nvfp4.testing import FAMILIES, experts_prefix

MOE = {"qwen3": "mlp", "mixtral": "block_sparse_moe"}
GATED = {n: NAMINGS[FAMILIES[n]["naming"]][0] is not None for n in FAMILIES}

_CURRENT = options.current  # the real one (host_layout patches the module's)


def host_layout(monkeypatch, value) -> None:
    """``options.host_layout`` forced to ``value`` for the rest of the test (or until the
    next call); undone at teardown. (``options.override`` is for a ``with`` block.)"""
    monkeypatch.setattr(options, "current",
                        lambda: dataclasses.replace(_CURRENT(), host_layout=value))


def prefix(naming: str, layer: int) -> str:
    return experts_prefix(naming, layer)


def experts_of(params: dict, naming: str, layer: int):
    """The loaded experts mapping of ``layer`` in nested ``params`` (by the dotted prefix)."""
    node = params
    for key in prefix(naming, layer).split("."):
        node = node[key]
    return node


def _rows(x: np.ndarray, i: int, axis: int) -> np.ndarray:
    """Fused rows ``[gate; up]`` (HF/vLLM order) to the kernel's ``[up; gate]``."""
    gate, up = np.split(x, [i], axis=axis)
    return np.concatenate([up, gate], axis=axis)


def stacked(tensors: dict, naming: str, layer: int, experts: int) -> list[np.ndarray]:
    """``[w13 (rows [up; gate], or up alone), w13 scale, w2, w2 scale]`` stacked from the
    experts' raw tensors, as uint8 (written apart from jax_nvfp4's MoELayer.parts)."""
    gate, up, down = NAMINGS[FAMILIES[naming]["naming"]]
    p = prefix(naming, layer)
    sfx = {"weight": "", "weight_scale": "_weight_scale"}

    def get(e, proj, field):
        return tensors[f"{p}.{e}.{proj}.{field}"].view(np.uint8)

    def w13(field):
        if naming == "gate_up_stacked":
            x = tensors[f"{p}.gate_up_proj{sfx[field]}"].view(np.uint8)
            return _rows(x, x.shape[1] // 2, axis=1)
        if naming == "gate_up":
            return np.stack([_rows(get(e, "gate_up_proj", field),
                                   get(e, "gate_up_proj", field).shape[0] // 2, 0)
                             for e in range(experts)])
        if gate is None:
            return np.stack([get(e, up, field) for e in range(experts)])
        return np.stack([np.concatenate([get(e, up, field), get(e, gate, field)])
                         for e in range(experts)])

    def w2(field):
        if naming == "gate_up_stacked":
            return tensors[f"{p}.down_proj{sfx[field]}"].view(np.uint8)
        return np.stack([get(e, down, field) for e in range(experts)])

    return [w13("weight"), w13("weight_scale"), w2("weight"), w2("weight_scale")]


def scalars(tensors: dict, naming: str, layer: int, experts: int) -> dict[str, np.ndarray]:
    """The checkpoint scalars as load gives them: w13 ``[E, 2]`` (gate, up), or ``[E]``
    (up's) when not gated; w2 ``[E]``."""
    gate, up, down = NAMINGS[FAMILIES[naming]["naming"]]
    p = prefix(naming, layer)

    def col(proj, field):
        if naming == "gate_up_stacked":
            x = np.asarray(tensors[f"{p}.{proj}_{field}"], np.float32).reshape(-1)
            return np.broadcast_to(x, (experts,)).astype(np.float32)
        return np.array([tensors[f"{p}.{e}.{proj}.{field}"] for e in range(experts)], np.float32)

    if gate is None:
        w13 = {"w13_weight_scale_2": col(up, "weight_scale_2"),
               "w13_input_scale": col(up, "input_scale")}
    else:
        w13 = {"w13_weight_scale_2": np.stack([col(gate, "weight_scale_2"),
                                               col(up, "weight_scale_2")], 1),
               "w13_input_scale": np.stack([col(gate, "input_scale"), col(up, "input_scale")], 1)}
    return {**w13, "w2_weight_scale_2": col(down, "weight_scale_2"),
            "w2_input_scale": col(down, "input_scale")}


KERNEL = ("output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar",
          "hidden_states_global_scale")


def kernel_reference(tensors: dict, naming: str, layer: int, experts: int) -> dict:
    """The kernel's scalars from the checkpoint tensors, in numpy float32 (one rounding per
    operation, in vLLM's order), gate and up apart; written apart from jax_nvfp4.numerics.scales."""
    s = scalars(tensors, naming, layer, experts)
    f32 = np.float32
    a1, a2 = f32(s["w13_input_scale"].max()), f32(s["w2_input_scale"].max())
    if not GATED[naming]:  # ReLU^2: GEMM1 dequantized before the activation, 1/a2 after
        return {"output1_scale_scalar": np.full(experts, f32(1) / a2, f32),
                "output1_scale_gate_scalar": a1 * s["w13_weight_scale_2"],
                "output2_scale_scalar": a2 * s["w2_weight_scale_2"],
                "hidden_states_global_scale": np.asarray(f32(1) / a1)}
    gate, up = s["w13_weight_scale_2"][:, 0], s["w13_weight_scale_2"][:, 1]
    return {"output1_scale_scalar": (a1 * up) * (f32(1) / a2),
            "output1_scale_gate_scalar": a1 * gate,
            "output2_scale_scalar": a2 * s["w2_weight_scale_2"],
            "hidden_states_global_scale": np.asarray(f32(1) / a1)}


def assert_kernel_scalars(moe, want: dict):
    """``moe``'s four kernel scalars: float32 jax arrays, shapes and bits as ``want``."""
    for name in KERNEL:
        x, w = moe[name], np.asarray(want[name], np.float32)
        assert x.dtype == np.float32 and x.shape == w.shape, (name, x.dtype, x.shape)
        assert np.asarray(x).tobytes() == w.tobytes(), (name, np.asarray(x), w)


def shard_of(path: Path, name: str) -> Path:
    return Path(path) / json.loads((Path(path) / INDEX).read_text())["weight_map"][name]


def rewrite(path: Path, tensors: dict, changes: dict, *, index: bool = False):
    """Rewrite the shards holding ``changes`` (name -> new array, or None to drop it).

    With ``index=True`` dropped tensors also leave the index.
    """
    path = Path(path)
    data = json.loads((path / INDEX).read_text())
    wm = data["weight_map"]
    for file in {wm[n] for n in changes}:
        new = {n: changes.get(n, x) for n, x in tensors.items() if wm[n] == file}
        save_file({n: x for n, x in new.items() if x is not None}, path / file)
    if index:
        for n, x in changes.items():
            if x is None:
                del wm[n]
        (path / INDEX).write_text(json.dumps(data))


def edit_json(file: Path, edit) -> None:
    """Read the JSON ``file``, let ``edit`` change the object in place, write it back."""
    file = Path(file)
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def compiled_programs(caplog, fn) -> list[str]:
    """The 'Compiling ...' log lines of every XLA program compiled while ``fn`` runs."""
    import logging

    import jax
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        caplog.clear()
        fn()
    return [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jax_nvfp4", *args], capture_output=True,
                          text=True, timeout=timeout)
