"""Shared fixtures: fresh random layers (never zeros) and the GPU marker."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

# Eight virtual CPU devices for the sharded tests (test_sharding.py). It must be set before
# JAX initialises its backends, hence here; jax.devices()[0] stays the default device, so
# the rest of the suite runs on one device as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 8)


def _has_cuda() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m gpu on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A numpy Generator with a fresh seed, reported when the test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)
