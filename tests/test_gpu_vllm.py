"""On a CUDA GPU: jax_nvfp4 with H padding against vLLM 0.33's own align + prepare functions.

vLLM's ``align_fp4_moe_hidden_dim_for_fi``, ``align_fp4_moe_weights_for_fi`` and
``prepare_static_weights_for_trtllm_fp4_moe`` are read from its wheel's source under
``.whl/`` (tests/vllm_source.py says what must be there) and run on torch CUDA tensors with
flashinfer's real ``nvfp4_block_scale_interleave`` kernel (it runs on Hopper). Without that
source the same shapes are checked against the numpy reference on a few experts.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

import jax_nvfp4
import vllm_source
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.backends.triton import program as _triton
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
SHAPES = [
    (128, 2688, 1856, False),  # Nemotron-3-Nano-30B-A3B NVFP4: Hp = 2816, Ip = 1920
    (64, 2688, 928, True),     # gated, H and I padded (Hp = 2816, Ip = 960)
    (16, 2880, 2880, True),    # gpt-oss-like sizes: Hp = 3072, I unpadded
]
BACKENDS = ["xla", "triton", "flashinfer"]


def _backend_or_skip(backend):
    if backend == "triton" and _triton.missing():
        pytest.skip(_triton.missing())
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")


def _want(layer, gated):
    """vLLM's bytes (all experts) or, without its source, the reference's on 3 experts."""
    if vllm_source.load() is not None:
        t = [torch.from_numpy(np.ascontiguousarray(x)).cuda() for x in layer]
        t[1], t[3] = t[1].view(torch.float8_e4m3fn), t[3].view(torch.float8_e4m3fn)
        return [x.cpu().numpy() for x in vllm_source.prepare(*t, gated=gated)], None
    pick = np.array([0, len(layer[0]) // 2, len(layer[0]) - 1])
    return _reference.prepare_layer(*(x[pick] for x in layer), gated=gated), pick


@pytest.mark.parametrize("e, h, i, gated", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("donate", [True, False])
def test_padded_h_equals_vllm(rng, e, h, i, gated, backend, donate):
    _backend_or_skip(backend)
    layer = random_layer(rng, e, h, i, gated=gated)
    want, pick = _want(layer, gated)
    out = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, donate=donate, backend=backend)
    spec = LayerSpec(e, h, i, gated)
    assert [tuple(x.shape) for x in out] == list(spec.shapes(padded=True))
    for name, g, w in zip(NAMES, out, want):
        g = np.asarray(g).view(np.uint8)
        assert_bytes_equal(g if pick is None else g[pick], w, f"{backend} {name}")
    back = jax_nvfp4.unprepare_layer(*out, gated=gated, hidden_size=h, intermediate_size=i)
    for name, b, x in zip(NAMES, back, layer):
        assert_bytes_equal(b, x, f"round trip {name}")


def test_vllm_source_is_there():
    """Not a skip in disguise: say loudly when the comparison fell back to the reference."""
    if vllm_source.load() is None:
        pytest.skip("vLLM 0.33's source is not under .whl/: compared with the reference only "
                    "(see tests/vllm_source.py)")
