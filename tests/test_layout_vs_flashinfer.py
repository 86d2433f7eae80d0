"""Bit-exact against flashinfer's own row-index helpers (pure torch, run on CPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fi_core = pytest.importorskip("flashinfer.fused_moe.core")

import jax_nvfp4
from jax_nvfp4.layout import reference as _reference
from helpers import assert_bytes_equal, random_layer, to_jax

EPILOGUE_TILE_M = 128  # what sglang, vLLM and TRT-LLM pass


def flashinfer_prepare(w13, s13, w2, s2, *, gated):
    """sglang/vLLM's prepare_static_weights_for_trtllm_fp4_moe, per expert, on CPU.

    The swizzle uses the CUDA kernel's offset formula (flashinfer's
    block_scale_interleave needs a GPU; the GPU tests compare with it).
    """
    cache: dict = {}
    t = [torch.from_numpy(a) for a in (w13, s13, w2, s2)]
    i13 = fi_core._maybe_get_cached_w3_w1_permute_indices(
        cache, t[0][0], EPILOGUE_TILE_M, is_gated_act_gemm=gated)
    i13_sf = fi_core._maybe_get_cached_w3_w1_permute_indices(
        cache, t[1][0], EPILOGUE_TILE_M, num_elts_per_sf=16, is_gated_act_gemm=gated)
    i2 = fi_core.get_w2_permute_indices_with_cache(cache, t[2][0], EPILOGUE_TILE_M)
    i2_sf = fi_core.get_w2_permute_indices_with_cache(
        cache, t[3][0], EPILOGUE_TILE_M, num_elts_per_sf=16)
    out_w13 = torch.stack([t[0][e][i13] for e in range(len(w13))]).numpy()
    out_w2 = torch.stack([t[2][e][i2] for e in range(len(w2))]).numpy()
    out_s13 = _reference.swizzle(torch.stack([t[1][e][i13_sf] for e in range(len(s13))]).numpy())
    out_s2 = _reference.swizzle(torch.stack([t[3][e][i2_sf] for e in range(len(s2))]).numpy())
    return out_w13, out_s13.reshape(s13.shape), out_w2, out_s2.reshape(s2.shape)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("m", [128, 256, 384, 4096])
def test_reference_indices_equal_flashinfers(m, gated):
    w = torch.empty(m, 8, dtype=torch.uint8)
    got = fi_core._maybe_get_cached_w3_w1_permute_indices({}, w, EPILOGUE_TILE_M,
                                                           is_gated_act_gemm=gated)
    np.testing.assert_array_equal(got.numpy(), _reference.w13_row_index(m, gated=gated))
    got = fi_core.get_w2_permute_indices_with_cache({}, w, EPILOGUE_TILE_M)
    np.testing.assert_array_equal(got.numpy(), _reference.shuffle_index(m))


@pytest.mark.parametrize(
    "e, h, i, gated",
    [
        (1, 128, 64, True),
        (3, 256, 128, True),
        (2, 384, 192, True),
        (4, 128, 128, False),
        (2, 256, 256, False),
        (2, 7168, 256, True),  # DeepSeek-V3 TP8 hidden size
    ],
)
@pytest.mark.parametrize("donate", [True, False])
def test_prepare_layer_equals_flashinfer_helpers(rng, e, h, i, gated, donate):
    layer = random_layer(rng, e, h, i, gated=gated)
    want = flashinfer_prepare(*layer, gated=gated)
    # hidden_alignment=128: flashinfer's helpers on the layer itself (H padding: test_hidden_padding)
    got = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, donate=donate, hidden_alignment=128)
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), got, want):
        assert_bytes_equal(g, w, name)
    assert [str(x.dtype) for x in got] == ["uint8", "float8_e4m3fn"] * 2
