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


# Without a GPU the Triton kernels run in Triton's CPU interpreter (read when the kernels
# are defined, so before jax_nvfp4.backends.triton.kernels is imported).
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture
def on_cpu():
    """Run on the CPU device, also on a machine with a GPU (for tests about CPU arrays)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def stand_in_kernel(monkeypatch):
    """flashinfer's swizzle as torch reshapes (§3.1 formula), honouring out= like the kernel."""
    torch = pytest.importorskip("torch")
    from torch_bridge import _bridge
    calls = []

    def kernel(src, *, out):
        b, r, c = src.shape
        rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
        x = torch.zeros(b, rp, cp, dtype=torch.uint8)
        x[:, :r, :c] = src
        out.copy_(x.reshape(b, rp // 128, 4, 32, cp // 4, 4).permute(0, 1, 4, 3, 2, 5).reshape(-1))
        calls.append(b)
        return out

    monkeypatch.setattr(_bridge, "_kernel", kernel)
    return calls
