"""vLLM 0.33's own padding and shuffle functions, read from its wheel's source (no vLLM install).

``load()`` finds ``vllm/model_executor/layers/quantization/utils/flashinfer_utils.py`` and
``.../flashinfer_fp4_moe.py`` under ``<repo>/.whl/``, either extracted (any depth) or inside a
``vllm-0.33.0-*.whl`` (read with zipfile), extracts the functions with ``ast`` and runs their
definitions with small stand-ins for vLLM's imports (``round_up``, the logger). It returns
None when the source is absent, so the tests that need it skip.

To make it present: ``pip download --no-deps vllm==0.33.0 -d .whl/vllm`` (the wheel is enough).
"""

from __future__ import annotations

import ast
import pathlib
import types
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1] / ".whl"
UTILS = "vllm/model_executor/layers/quantization/utils/"
FUNCTIONS = {
    UTILS + "flashinfer_utils.py": ("align_fp4_moe_hidden_dim_for_fi",
                                    "align_fp4_moe_weights_for_fi"),
    UTILS + "flashinfer_fp4_moe.py": ("prepare_static_weights_for_trtllm_fp4_moe",),
}


def _source(member: str) -> str | None:
    for path in sorted(ROOT.rglob(pathlib.Path(member).name)):
        if path.as_posix().endswith(member):
            return path.read_text()
    for wheel in sorted(ROOT.rglob("vllm-0.33.0-*.whl")):
        with zipfile.ZipFile(wheel) as z:
            if member in z.namelist():
                return z.read(member).decode()
    return None


class _Logger:
    def __getattr__(self, name):  # warning_once, info_once, debug, ...
        return lambda *args, **kwargs: None


def load():
    """A namespace with vLLM's functions, or None when its source is not under .whl/."""
    import torch

    namespace = {"torch": torch, "logger": _Logger(),
                 "round_up": lambda x, y: ((x + y - 1) // y) * y}
    found = []
    for member, names in FUNCTIONS.items():
        text = _source(member)
        if text is None:
            return None
        tree = ast.parse(text)
        nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        if {n.name for n in nodes} != set(names):
            return None
        exec(compile(ast.Module(body=nodes, type_ignores=[]), member, "exec"), namespace)
        found += names
    return types.SimpleNamespace(**{n: namespace[n] for n in found})


def prepare(w13, s13, w2, s2, *, gated: bool, hidden_alignment: int = 256):
    """vLLM 0.33's FLASHINFER_TRTLLM path of ``prepare_nvfp4_moe_layer_for_fi_or_cutlass`` on
    torch tensors whose w13 rows are already ``[w3; w1]`` (the reorder step): H padded, then
    I (64 gated, 128 not), then ``prepare_static_weights_for_trtllm_fp4_moe``. Returns four
    uint8 tensors. The swizzle is ``flashinfer.nvfp4_block_scale_interleave`` (CUDA; the
    caller may stand it in on CPU)."""
    import torch

    vllm = load()
    w13, s13, w2, s2, _ = vllm.align_fp4_moe_hidden_dim_for_fi(
        w13, s13, w2, s2, min_alignment=hidden_alignment)
    w13, s13, w2, s2, _ = vllm.align_fp4_moe_weights_for_fi(
        w13, s13, w2, s2, gated, 64 if gated else 128)
    out = vllm.prepare_static_weights_for_trtllm_fp4_moe(
        w13, w2, s13, s2, hidden_size=w2.size(-2),
        intermediate_size=w13.size(-2) // 2 if gated else w13.size(-2),
        num_experts=w13.size(0), is_gated_activation=gated)
    return [t.view(torch.uint8) for t in out]
