"""Padded layers prepared donated: one array after another, each input freed before the next
result is allocated, so the transient is about the largest array, not the whole layer.

``one_array_min_bytes=0`` puts these small layers on that path (the default keeps layers
under 64 MiB in one program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_nvfp4
from jax_nvfp4 import options, transform as _prepare
from jax_nvfp4.backends.triton import program as _triton
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax

pytestmark = pytest.mark.usefixtures("on_cpu")
NAMES = ("w13", "w13_scale", "w2", "w2_scale")
BACKENDS = ["xla", pytest.param("triton", marks=pytest.mark.skipif(
    _triton.missing() is not None or not _triton.interpreting(),
    reason="needs triton in its interpreter (TRITON_INTERPRET=1, set by conftest on CPU)"))]
SHAPES = [(3, 256, 96, True),    # I padded to 128
          (2, 320, 128, False),  # not gated, H padded to 512
          (2, 192, 80, True)]    # both padded


def _job(arrays, gated, backend):
    return _prepare.plan_job(arrays, gated=gated, donate=True, backend=backend,
                             chunk_bytes=None, inverse=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("e, h, i, gated", SHAPES)
def test_padded_donated_layer_is_bit_exact_and_consumed(rng, backend, e, h, i, gated):
    layer = random_layer(rng, e, h, i, gated=gated)
    arrays = to_jax(layer)
    with options.override(one_array_min_bytes=0):
        assert isinstance(_job(arrays, gated, backend).program, _prepare.OneArrayAtATime)
        out = jax_nvfp4.prepare_layer(*arrays, gated=gated, donate=True, backend=backend)
    assert all(x.is_deleted() for x in arrays)
    for name, got, want in zip(NAMES, out, _reference.prepare_layer(*layer, gated=gated)):
        assert_bytes_equal(got, want, name)
    assert out[1].dtype == out[3].dtype == jnp.float8_e4m3fn


def test_each_input_is_deleted_before_the_next_array_runs(rng):
    arrays = to_jax(random_layer(rng, 2, 256, 96))
    with options.override(one_array_min_bytes=0):
        program = _job(arrays, True, "xla").program
    seen = []

    def watch(step):
        def run(x):
            seen.append([a.is_deleted() for a in arrays])
            return step(x)
        return run

    watched = object.__new__(_prepare.OneArrayAtATime)
    watched.fns, watched.steps = program.fns, tuple(watch(s) for s in program.steps)
    watched(*arrays)
    assert seen == [[False] * 4, [True, False, False, False], [True, True, False, False],
                    [True, True, True, False]]
    assert all(a.is_deleted() for a in arrays)


def test_transient_is_about_the_largest_array_not_the_layer(rng):
    spec = LayerSpec(8, 256, 96, True)  # w13 is 2/3 of the layer
    arrays = to_jax(random_layer(rng, 8, 256, 96))
    with options.override(one_array_min_bytes=0):
        program = _job(arrays, True, "xla").program
        whole = _prepare.compiled(spec, inverse=False, donate=False, chunks=None)
    stats = whole.lower(*arrays).compile().memory_analysis()
    padded = [int(np.prod(s)) for s in spec.shapes(padded=True)]
    transient = program.transient_bytes(*arrays)
    assert max(padded) <= transient < stats.output_size_in_bytes + stats.temp_size_in_bytes
    assert transient <= max(padded) + stats.temp_size_in_bytes  # never more than one program


def test_small_layers_and_unpadded_ones_keep_one_program(rng):
    padded = to_jax(random_layer(rng, 2, 256, 96))  # 0.1 MiB: under the default 64 MiB
    assert not isinstance(_job(padded, True, "xla").program, _prepare.OneArrayAtATime)
    with options.override(one_array_min_bytes=0):
        unpadded = _job(to_jax(random_layer(rng, 2, 256, 128)), True, "xla")
        kept = _prepare.plan_job(padded, gated=True, donate=False, backend="xla",
                                 chunk_bytes=None, inverse=False)
    assert not isinstance(unpadded.program, _prepare.OneArrayAtATime)  # in place
    assert not isinstance(kept.program, _prepare.OneArrayAtATime)  # not donated


@pytest.mark.skipif(len(jax.devices("cpu")) < 4, reason="needs 4 CPU devices (conftest.py)")
def test_sharded_padded_layer_goes_one_array_at_a_time_on_every_device(rng):
    e, h, i = 8, 256, 96
    layer = random_layer(rng, e, h, i)
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices("cpu")[:4])
    sharding = NamedSharding(mesh, P("x"))
    arrays = [jax.device_put(x if k % 2 == 0 else x.view(ml_dtypes.float8_e4m3fn), sharding)
              for k, x in enumerate(layer)]
    with options.override(one_array_min_bytes=0):
        assert isinstance(_job(arrays, True, "xla").program, _prepare.OneArrayAtATime)
        out = jax_nvfp4.prepare_layer(*arrays, donate=True)
    assert all(x.is_deleted() for x in arrays)
    for name, got, want in zip(NAMES, out, _reference.prepare_layer(*layer)):
        assert got.sharding == sharding
        assert_bytes_equal(got, want, name)
