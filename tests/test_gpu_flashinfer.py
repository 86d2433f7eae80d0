"""backend="flashinfer" and torch_bridge on a CUDA GPU: bytes, pointers, torch's allocator, races."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
flashinfer = pytest.importorskip("flashinfer")
fi_core = pytest.importorskip("flashinfer.fused_moe.core")

import jax_nvfp4
import torch_bridge
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, assert_in_place_and_torch_allocates_nothing
from helpers import assert_no_race, random_layer, to_jax

NAMES = ("w13", "w13_scale", "w2", "w2_scale")


def flashinfer_direct(layer, *, gated):
    """vLLM's algorithm on torch CUDA tensors: flashinfer's indices and its kernel (batched)."""
    spec = LayerSpec(layer[2].shape[0], layer[2].shape[1], 2 * layer[2].shape[2], gated)
    padded = (_reference._pad_i(*layer, spec.intermediate, spec.padded_i, gated)
              if spec.needs_padding else layer)
    t = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in padded]
    cache: dict = {}
    i13 = fi_core._maybe_get_cached_w3_w1_permute_indices(cache, t[0][0], 128,
                                                           is_gated_act_gemm=gated).cuda()
    i2 = fi_core.get_w2_permute_indices_with_cache(cache, t[2][0], 128).cuda()
    w13 = t[0][:, i13]
    s13 = flashinfer.block_scale_interleave(t[1][:, i13].contiguous())
    w2 = t[2][:, i2]
    s2 = flashinfer.block_scale_interleave(t[3][:, i2].contiguous())
    return [x.cpu().numpy().reshape(p.shape) for x, p in zip((w13, s13, w2, s2), padded)]


@pytest.mark.parametrize("e, h, i, gated", [(1, 128, 64, True), (3, 256, 96, True),
                                            (5, 384, 128, False), (2, 256, 80, False),
                                            (256, 256, 128, True), (17, 7168, 256, True)])
@pytest.mark.parametrize("donate", [True, False])
def test_flashinfer_backend_is_bit_exact(rng, e, h, i, gated, donate):
    layer = random_layer(rng, e, h, i, gated=gated)
    want = flashinfer_direct(layer, gated=gated)
    # hidden_alignment=128: flashinfer's helpers pad no H (H % 256 padding is vLLM's, upstream)
    for name, r, w in zip(NAMES, _reference.prepare_layer(*layer, gated=gated,
                                                          hidden_alignment=128), want):
        assert_bytes_equal(r, w, f"reference vs flashinfer {name}")
    fi = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, donate=donate,
                                 backend="flashinfer", chunk_bytes=1 << 18, hidden_alignment=128)
    xla = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, donate=donate, backend="xla",
                                  hidden_alignment=128)
    for name, f, x, w in zip(NAMES, fi, xla, want):
        assert_bytes_equal(f, w, f"flashinfer backend {name}")
        assert_bytes_equal(x, w, f"xla backend {name}")


def test_outputs_live_in_the_donated_buffers_and_torch_allocates_nothing(rng):
    assert_in_place_and_torch_allocates_nothing(rng, "flashinfer")


def test_eager_bridge_writes_into_jax_memory(rng):
    b = rng.integers(0, 256, size=(5, 4096, 448), dtype=np.uint8)
    scales = jnp.asarray(b)
    out = jnp.asarray(rng.integers(0, 256, size=(b.size,), dtype=np.uint8))
    ptr = out.unsafe_buffer_pointer()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated()
    got = torch_bridge.block_scale_interleave(scales, out=out)
    assert torch.cuda.max_memory_allocated() == before
    assert got.unsafe_buffer_pointer() == ptr
    np.testing.assert_array_equal(np.asarray(got), _reference.swizzle(b))
    t = torch_bridge.to_torch(scales)
    assert t.data_ptr() == scales.unsafe_buffer_pointer() and t.is_cuda
    back = torch_bridge.from_torch(t)
    assert back.unsafe_buffer_pointer() == t.data_ptr()
    del t, back
    jax.jit(lambda a: a ^ 1, donate_argnums=0)(scales)  # no view left to block donation
    assert scales.is_deleted()


def test_200_prepares_interleaved_with_jax_work_have_no_race(rng):
    assert_no_race(rng, "flashinfer")
