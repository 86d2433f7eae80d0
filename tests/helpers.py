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


def assert_no_race(rng, backend: str, rounds: int = 200):
    """``rounds`` prepares with ``backend``, each followed by unrelated JAX work on the
    outputs queued behind the kernels with no sync, then unprepared: every sum and the
    final bytes must match (a kernel off XLA's stream would race with that work)."""
    import jax_nvfp4
    from jax_nvfp4.layout import reference as _reference
    host = random_layer(rng, 8, 1024, 512)
    want = [np.asarray(w).view(np.uint8) for w in _reference.prepare_layer(*host, gated=True)]
    sums_want = [int(w.astype(np.uint64).sum()) for w in want]
    layer = to_jax(host)
    sums = []
    for _ in range(rounds):
        out = jax_nvfp4.prepare_layer(*layer, backend=backend, chunk_bytes=1 << 16)
        sums.append([jnp.sum(jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32))
                     for x in out])
        layer = jax_nvfp4.unprepare_layer(*out, backend="xla", chunk_bytes=1 << 16)
    assert [[int(s) for s in row] for row in sums] == [sums_want] * rounds
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), layer, host):
        assert_bytes_equal(g, w, f"after {rounds} round trips {name}")
