"""The 128x4 scale swizzle against an independent transcription of the kernel's offsets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jax_nvfp4.layout import index as _layout, reference as _reference


def kernel_offsets_loop(rows, cols):
    """get_sf_out_offset_128x4, transcribed line by line from quantization_utils.cuh."""
    num_col_vecs_padded = -(-cols // 4) * 4
    out = np.empty((rows, cols), np.int64)
    for m in range(rows):
        for k in range(cols):
            inner_k = k % 4
            inner_k_stride = 1
            inner_m = (m % 128) // 32
            inner_m_stride = 4 * inner_k_stride
            outer_m = m % 32
            outer_m_stride = 4 * inner_m_stride
            k_tile = k // 4
            k_tile_stride = 32 * outer_m_stride
            num_k_tiles = num_col_vecs_padded // 4
            m_tile = m // 128
            m_tile_stride = num_k_tiles * k_tile_stride
            out[m, k] = (m_tile * m_tile_stride + k_tile * k_tile_stride + outer_m * outer_m_stride
                         + inner_m * inner_m_stride + inner_k * inner_k_stride)
    return out


@pytest.mark.parametrize("rows, cols", [(128, 4), (256, 8), (130, 7), (200, 90), (384, 448)])
def test_reference_offsets_match_kernel_transcription(rows, cols):
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    np.testing.assert_array_equal(_reference.sf_offset_128x4(0, r, c, rows, cols),
                                  kernel_offsets_loop(rows, cols))


@pytest.mark.parametrize("e, rows, cols", [(1, 128, 4), (3, 256, 448), (2, 512, 8), (5, 128, 128)])
def test_swizzle_matches_kernel_offsets(rng, e, rows, cols):
    x = rng.integers(0, 256, size=(e, rows, cols), dtype=np.uint8)
    got = np.asarray(_layout.swizzle_scales(jnp.asarray(x))).reshape(-1)
    want = _reference.swizzle(x)
    np.testing.assert_array_equal(got, want)
    back = np.asarray(_layout.unswizzle_scales(jnp.asarray(got.reshape(x.shape))))
    np.testing.assert_array_equal(back, x)


def test_reference_swizzle_pads_with_zeros(rng):
    x = rng.integers(1, 256, size=(2, 130, 7), dtype=np.uint8)  # no zero byte in x
    out = _reference.swizzle(x).reshape(2, -1)
    assert out.shape == (2, 256 * 8)
    assert (out != 0).sum() == 130 * 7 * 2  # every input byte lands once; the rest is padding
