"""Helpers shared by the tests (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_nvfp4.testing import random_layer  # noqa: F401  (re-exported for the tests)


def to_jax(arrays, scale_dtype=jnp.float8_e4m3fn):
    """A numpy layer as jax arrays, scales as ``scale_dtype`` (same bytes)."""
    out = [jnp.asarray(a) for a in arrays]
    out[1], out[3] = (jax.lax.bitcast_convert_type(s, scale_dtype) for s in (out[1], out[3]))
    return out


def as_bytes(x) -> np.ndarray:
    """The bytes of a jax/numpy array as numpy uint8 (float8 included)."""
    return np.asarray(x).view(np.uint8)


def assert_bytes_equal(got, want, what=""):
    got, want = as_bytes(got), as_bytes(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{what}: {len(bad)} bytes differ, first at {bad[0].tolist()}"
