"""Donated triton backend per shape: wall and device ms, checked (issue 7, gated w13 in one pass)."""

from __future__ import annotations

import statistics

import jax

from jax_nvfp4 import _bench, _prepare, _triton
from jax_nvfp4._spec import LayerSpec
from jax_nvfp4.testing import random_device_layer



def call(*xs):
    return _prepare.prepare_layer(*xs, backend="triton")


def measure(name, bw):
    spec = LayerSpec(*_bench.SHAPES[name], True)
    layer = random_device_layer(jax.random.key(9), *_bench.SHAPES[name], gated=True)
    ref = _bench.Reference(spec, layer)

    def make():
        return [_bench._copy(x) for x in layer]
    ref.check(call(*make()), name)
    wall = 1e3 * statistics.median(_bench.time_jax(call, make, 10))
    job = _prepare.plan_job(layer, gated=True, donate=True, backend="triton", chunk_bytes=None,
                            inverse=False)
    dev = _bench.device_time(job.program, True, make, 10)
    floor = 1e3 * 2 * spec.nbytes / bw
    print(f"{name}: one pass={_triton.w13_in_one_pass(spec)} wall {wall:.3f} ms "
          f"({wall / floor:.2f}x), device {dev:.3f} ms ({dev / floor:.2f}x), floor {floor:.3f}",
          flush=True)


bw = _bench.copy_bandwidth(jax.devices()[0], 1 << 30, 5)
for name in ("deepseek-v3-tp8", "qwen3-30b-a3b", "deepseek-v3-ep8", "deepseek-v3"):
    measure(name, bw)
