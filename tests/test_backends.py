"""Backend selection and refusals (CPU), and the flashinfer backend's plumbing with a stand-in kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

import jax_nvfp4
from jax_nvfp4.backends import select as _backends
from jax_nvfp4 import transform as _prepare
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, assert_missing_extra_refused, random_layer, to_jax


pytestmark = pytest.mark.usefixtures("on_cpu")


def test_import_needs_neither_torch_nor_flashinfer():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['flashinfer'] = None\n"
            "import jax_nvfp4, torch_bridge, jax_nvfp4.backends.flashinfer\n"
            "assert 'torch is not installed' in jax_nvfp4.backends.flashinfer.missing()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_unknown_backend_is_refused_and_inputs_stay_alive(rng):
    layer = to_jax(random_layer(rng, 2, 128, 64))
    with pytest.raises(ValueError, match="backend must be one of"):
        jax_nvfp4.prepare_layer(*layer, backend="cuda")
    assert not any(x.is_deleted() for x in layer)
    out = jax_nvfp4.prepare_layer(*layer)
    with pytest.raises(ValueError, match="backend must be one of"):
        jax_nvfp4.unprepare_layer(*out, backend="cuda")
    assert not any(x.is_deleted() for x in out)


def test_auto_and_xla_resolve_to_xla_on_cpu(rng):
    layer = to_jax(random_layer(rng, 2, 128, 64))
    assert _backends.resolve_backend("auto", layer) == "xla"
    assert _backends.resolve_backend("xla", layer) == "xla"
    assert _backends.resolve_backend("flashinfer", layer, inverse=True) == "xla"


def test_flashinfer_on_cpu_arrays_is_refused_before_donation(rng):
    layer = to_jax(random_layer(rng, 2, 128, 64))
    with pytest.raises((ValueError, ImportError), match="CUDA|install"):
        jax_nvfp4.prepare_layer(*layer, backend="flashinfer")
    assert not any(x.is_deleted() for x in layer)
    with pytest.raises((ValueError, ImportError), match="CUDA|install"):
        jax_nvfp4.prepare({"moe": dict(zip(("w13_weight", "w13_weight_scale", "w2_weight",
                                            "w2_weight_scale"), layer))}, backend="flashinfer")
    assert not any(x.is_deleted() for x in layer)


def test_flashinfer_missing_is_an_import_error_naming_the_extra(rng, monkeypatch):
    assert_missing_extra_refused(rng, monkeypatch, "flashinfer")


@pytest.mark.parametrize("e, h, i, gated, chunk_bytes", [(5, 256, 128, True, 20000),
                                                         (3, 128, 128, False, None)])
@pytest.mark.parametrize("donate", [True, False])
def test_flashinfer_program_plumbing_on_cpu(rng, stand_in_kernel, e, h, i, gated, chunk_bytes,
                                            donate):
    """The jitted program of backend="flashinfer" (buffer_callback, chunk offsets, aliasing)."""
    layer = random_layer(rng, e, h, i, gated=gated)
    spec = LayerSpec(e, h, i, gated, hidden_alignment=128)  # unpadded: in place (H padding:
    arrays = to_jax(layer)                                  # test_hidden_padding.py)
    pointers = [x.unsafe_buffer_pointer() for x in arrays]
    chunks = _prepare.experts_per_chunk(spec, chunk_bytes)
    out = _prepare.compiled(spec, inverse=False, donate=donate, chunks=chunks,
                             backend="flashinfer")(*arrays)
    for name, g, w in zip(("w13", "w13_scale", "w2", "w2_scale"), out,
                          _reference.prepare_layer(*layer, gated=gated, hidden_alignment=128)):
        assert_bytes_equal(g, w, name)
    assert stand_in_kernel, "the kernel was not called"
    if donate:
        assert [x.unsafe_buffer_pointer() for x in out] == pointers


def test_installed_asks_the_finder_once_per_module(monkeypatch):
    """``installed`` (asked by ``auto`` on every call) remembers a module it found, and asks
    a patched finder afresh (how the tests uninstall a package)."""
    import importlib.util

    from jax_nvfp4.backends import installed as _installed
    real, calls = importlib.util.find_spec, []

    def counting(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(importlib.util, "find_spec", counting)
    assert _installed.installed("numpy") and _installed.installed("numpy")
    assert calls == ["numpy"]
    assert not _installed.installed("no_such_module_jax_nvfp4")
    assert not _installed.installed("no_such_module_jax_nvfp4")  # not found: asked each time
    assert calls == ["numpy"] + ["no_such_module_jax_nvfp4"] * 2
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not _installed.installed("numpy")
