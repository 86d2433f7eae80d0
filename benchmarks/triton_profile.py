"""Where the triton backend's time goes, per shape (issue 7 exploration, one GPU).

Per shape: each kernel alone (torch events), the jitted program alone, prepare_layer
whole, an empty buffer_callback over the same four buffers (the callback's fixed cost),
and the host time spent inside the callback. Outputs checked against the reference.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import torch
from jax.experimental.buffer_callback import buffer_callback

import torch_bridge
from jax_nvfp4 import _bench, _prepare
from jax_nvfp4 import _triton_kernels as K
from jax_nvfp4._spec import LayerSpec
from jax_nvfp4.testing import random_device_layer


def events(fn, repeats=10):
    out = []
    for k in range(3 + repeats):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        torch.cuda.synchronize()
        if k >= 3:
            out.append(t0.elapsed_time(t1))
    return statistics.median(out)


def med_ms(fn, make, repeats=10):
    return 1e3 * statistics.median(_bench.time_jax(fn, make, repeats, warmup=2))


def _kernels(spec, k, x):
    """(out of place, in place, copy_) ms of array ``k``'s kernels on its bytes ``x``."""
    dst = torch.empty_like(x)
    steps = K.rows_steps if k in (0, 2) else K.scales_steps
    gated = k < 2
    stream = dict(stream=torch.cuda.current_stream().cuda_stream, device=x.device.index)
    oop = events(lambda: K.run_steps(steps(x.shape, gated=gated, in_place=False, src=0, dst=1),
                                     [x, dst], **stream))
    if gated:
        chunk = _prepare.experts_per_chunk(spec, None, None)[k]
        scratch = torch.empty(chunk * x[0].numel(), dtype=torch.uint8, device=x.device)
        plan = K.gated_in_place_steps(x.shape, steps, buf=0, scratch=1, chunk=chunk)
        inplace = events(lambda: K.run_steps(plan, [dst, scratch], **stream))
    else:
        plan = steps(x.shape, gated=False, in_place=True)
        inplace = events(lambda: K.run_steps(plan, [dst], **stream))
    return oop, inplace, events(lambda: dst.copy_(x))


def profile(name, shape):
    e, h, i = shape
    spec = LayerSpec(e, h, i, True)
    layer = random_device_layer(jax.random.key(3), e, h, i, gated=True)
    ref = _bench.Reference(spec, layer)
    res = {}
    src = [torch_bridge.to_torch(x) for x in layer]
    for tile in (4096, 16384, 8192):  # the default last
        K.TILE_UNITS = tile
        sums = [_kernels(spec, k, x) for k, x in enumerate(src)]
        res[f"tile{tile}_oop_sum_ms"] = sum(v[0] for v in sums)
        res[f"tile{tile}_inplace_sum_ms"] = sum(v[1] for v in sums)
    for k, x in enumerate(src):
        a, b, c = _kernels(spec, k, x)
        res[f"kernel_{k}_oop_ms"], res[f"kernel_{k}_inplace_ms"], res[f"copy_{k}_ms"] = a, b, c
    res["kernels_oop_sum_ms"] = sum(res[f"kernel_{k}_oop_ms"] for k in range(4))
    res["kernels_inplace_sum_ms"] = sum(res[f"kernel_{k}_inplace_ms"] for k in range(4))
    del src
    torch.cuda.empty_cache()

    host = []
    run = K.run_steps

    def timed_run(*a, **kw):
        t = time.perf_counter()
        run(*a, **kw)
        host.append(time.perf_counter() - t)
    K.run_steps = timed_run
    for donate in (True, False):
        tag = "donated" if donate else "not_donated"

        def make():
            return [_bench._copy(x) for x in layer] if donate else list(layer)
        job = _prepare.plan_job(layer, gated=True, donate=donate, backend="triton",
                                chunk_bytes=None, inverse=False)
        out = job.program(*make())
        ref.check(out, tag)
        del out
        host.clear()
        res[f"program_{tag}_ms"] = med_ms(job.program, make)
        res[f"host_in_callback_{tag}_ms"] = 1e3 * statistics.median(host)
        res[f"prepare_layer_{tag}_ms"] = med_ms(
            lambda *xs: _prepare.prepare_layer(*xs, backend="triton", donate=donate), make)
        t = time.perf_counter()
        for _ in range(20):
            _prepare.plan_job(layer, gated=True, donate=donate, backend="triton",
                              chunk_bytes=None, inverse=False)
        res[f"plan_job_{tag}_ms"] = 1e3 * (time.perf_counter() - t) / 20
    K.run_steps = run
    res["launch_mode"] = str(K._ARGS_MODE)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in layer]
    noop = jax.jit(lambda *xs: tuple(buffer_callback(lambda ctx, o, *a: None, shapes,
                                                     input_output_aliases={0: 0, 1: 1, 2: 2, 3: 3}
                                                     )(*xs)), donate_argnums=(0, 1, 2, 3))
    res["empty_callback_donated_ms"] = med_ms(noop, lambda: [_bench._copy(x) for x in layer])
    ident = jax.jit(lambda *xs: xs, donate_argnums=(0, 1, 2, 3))
    res["identity_jit_donated_ms"] = med_ms(ident, lambda: [_bench._copy(x) for x in layer])
    print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                            for k, v in res.items()}), flush=True)
    return res


if __name__ == "__main__":
    out = {n: profile(n, _bench.SHAPES[n]) for n in ("deepseek-v3-tp8", "qwen3-30b-a3b",
                                                     "deepseek-v3")}
    if len(sys.argv) > 1:
        json.dump(out, open(sys.argv[1], "w"), indent=1)
