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


def assert_missing_extra_refused(rng, monkeypatch, backend: str):
    """With nothing importable (``importlib.util.find_spec`` finds nothing), ``backend`` is
    an ImportError naming the ``jax-nvfp4[backend]`` extra, before anything is donated."""
    import importlib.util

    import pytest

    import jax_nvfp4
    layer = to_jax(random_layer(rng, 2, 128, 64))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=rf"jax-nvfp4\[{backend}\]"):
        jax_nvfp4.prepare_layer(*layer, backend=backend)
    assert not any(x.is_deleted() for x in layer)


def assert_in_place_and_torch_allocates_nothing(rng, backend: str):
    """On a CUDA device: ``backend``'s outputs are the donated buffers (same pointers, the
    inputs deleted) and torch's allocator gives out nothing (after one warm-up call)."""
    import torch

    import jax_nvfp4
    layer = to_jax(random_layer(rng, 64, 7168, 256))
    jax_nvfp4.prepare_layer(*to_jax(random_layer(rng, 64, 7168, 256)), backend=backend)
    pointers = [x.unsafe_buffer_pointer() for x in layer]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated()
    out = jax.block_until_ready(jax_nvfp4.prepare_layer(*layer, backend=backend,
                                                        chunk_bytes=1 << 24))
    assert torch.cuda.max_memory_allocated() == before
    assert [x.unsafe_buffer_pointer() for x in out] == pointers
    assert all(x.is_deleted() for x in layer)
