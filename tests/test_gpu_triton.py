"""backend="triton" compiled on a CUDA GPU: bytes, arrays over 2 GiB, pointers, torch, races."""

from __future__ import annotations

import jax
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import jax_nvfp4
from jax_nvfp4 import options
from jax_nvfp4.backends import select as _backends
from jax_nvfp4.bench import layout as _bench
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.backends.triton import program as _triton
from jax_nvfp4.layout.spec import LayerSpec
from jax_nvfp4.testing import random_device_layer
from helpers import assert_bytes_equal, assert_in_place_and_torch_allocates_nothing
from helpers import assert_no_race, random_layer, to_jax

NAMES = ("w13", "w13_scale", "w2", "w2_scale")
ROUTES = ["callback", pytest.param("xla", marks=pytest.mark.skipif(
    _triton.jax_triton_missing() is not None, reason="needs jax-triton"))]


@pytest.fixture
def callback_route():
    """Tests of the buffer_callback launcher: that route, whatever jax-triton gives."""
    with options.override(triton_route="callback"):
        yield


def test_auto_picks_triton_on_cuda_where_xla_would_move_bytes(rng):
    from jax_nvfp4 import transform as _prepare
    layer = to_jax(random_layer(rng, 2, 128, 64))
    with options.override(triton_min_bytes=0):  # its rule on a small layer
        assert _backends.resolve_backend("auto", layer) == (
            "triton" if options.current().auto_picks_triton else "xla")
        job = _prepare.plan_job(layer, gated=True, donate=False, backend="auto",
                                chunk_bytes=None, inverse=False)
        assert job.program is _prepare.compiled(  # the backend and route the job chose
            job.spec, inverse=False, donate=False, chunks=job.chunks, backend=job.backend,
            pallas=True, via=_triton.route() if job.backend == "triton" else None)
        job = _prepare.plan_job(layer, gated=True, donate=True, backend="auto",
                                chunk_bytes=None, inverse=False)  # in place, w13 in one pass
        assert job.program is _prepare.compiled(job.spec, inverse=False, donate=True,
                                                chunks=job.chunks, backend="triton",
                                                pallas=True, via=_triton.route())
    assert _backends.needs_triton(LayerSpec(256, 7168, 2048, True))  # w13: 3.76 GB
    assert not _backends.needs_triton(LayerSpec(128, 7168, 2048, True))


@pytest.mark.parametrize("e, h, i, gated", [(1, 128, 64, True), (3, 256, 96, True),
                                            (5, 384, 128, False), (2, 256, 80, False),
                                            (256, 256, 128, True), (17, 7168, 256, True),
                                            (6, 2048, 768, True)])
@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("route", ROUTES)
def test_triton_backend_is_bit_exact(rng, e, h, i, gated, donate, route):
    layer = random_layer(rng, e, h, i, gated=gated)
    # one_array_min_bytes=0: padded and donated, one array after another (2-buffer kernels)
    with options.override(triton_route=route, one_array_min_bytes=0):
        out = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, donate=donate,
                                      backend="triton", chunk_bytes=1 << 18)
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=gated)):
        assert_bytes_equal(g, w, name)


def test_deepseek_v3_layer_over_2_gib_is_bit_exact_in_place():
    """w13 is 3.76 GB: past int32 offsets (Pallas' Triton lowering failed exactly here)."""
    spec = LayerSpec(256, 7168, 2048, True)
    layer = random_device_layer(jax.random.key(5), 256, 7168, 2048, gated=True)
    ref = _bench.Reference(spec, layer)
    pointers = [x.unsafe_buffer_pointer() for x in layer]
    out = jax_nvfp4.prepare_layer(*layer, backend="triton")
    assert [x.unsafe_buffer_pointer() for x in out] == pointers
    ref.check(out, "triton in place")
    del out, layer
    layer = random_device_layer(jax.random.key(5), 256, 7168, 2048, gated=True)
    ref.check(jax_nvfp4.prepare_layer(*layer, backend="triton", donate=False), "out of place")


def test_torch_allocates_nothing_and_outputs_keep_the_buffers(rng):
    assert_in_place_and_torch_allocates_nothing(rng, "triton")


def test_200_prepares_interleaved_with_jax_work_have_no_race(rng):
    assert_no_race(rng, "triton")



@pytest.mark.skipif(_triton.jax_triton_missing() is not None, reason="needs jax-triton")
@pytest.mark.parametrize("donate", [True, False])
def test_xla_route_is_custom_calls_in_place_without_a_callback(rng, donate):
    """With jax-triton the program holds jaxlib's Triton custom calls and no Python
    callback; donated, the outputs are the inputs' buffers."""
    from jax_nvfp4 import transform as _prepare
    assert _triton.route() == "xla"
    layer = random_layer(rng, 20, 512, 256)
    arrays = to_jax(layer)
    job = _prepare.plan_job(arrays, gated=True, donate=donate, backend="triton",
                            chunk_bytes=1 << 18, inverse=False)
    hlo = job.program.lower(*arrays).as_text()
    assert "triton_kernel_call" in hlo and "callback" not in hlo
    pointers = [x.unsafe_buffer_pointer() for x in arrays]
    out = _prepare.run_job(job)
    if donate:
        assert [x.unsafe_buffer_pointer() for x in out] == pointers
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=True)):
        assert_bytes_equal(g, w, name)


@pytest.mark.usefixtures("callback_route")
def test_kernels_launch_without_tritons_dispatch(rng):
    from jax_nvfp4.backends.triton import kernels as _triton_kernels
    jax.block_until_ready(jax_nvfp4.prepare_layer(*to_jax(random_layer(rng, 2, 256, 128)),
                                                  backend="triton"))
    assert _triton_kernels._ARGS_MODE, "the direct launch path was not taken"


@pytest.mark.usefixtures("callback_route")
def test_a_failing_direct_launch_falls_back_to_tritons_dispatch(rng, monkeypatch):
    """The direct launch uses Triton internals; if they change, the bytes must not."""
    from jax_nvfp4.backends.triton import kernels as _triton_kernels

    def broken(*args, **kwargs):
        raise AttributeError("no such launcher")

    monkeypatch.setattr(_triton_kernels, "_launch_direct", broken)
    monkeypatch.setattr(_triton_kernels, "_DIRECT", [True])
    layer = random_layer(rng, 9, 256, 128)
    with pytest.warns(RuntimeWarning, match="directly failed"):
        out = jax_nvfp4.prepare_layer(*to_jax(layer), backend="triton", chunk_bytes=1 << 16)
        jax.block_until_ready(out)
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=True)):
        assert_bytes_equal(g, w, name)
