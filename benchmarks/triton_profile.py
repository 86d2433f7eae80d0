"""Where the triton backend's time goes, per shape (issue 7 exploration, one GPU).

Per shape: the planned launches alone (torch events, no JAX), the jitted program
alone, prepare_layer whole, the host time inside the callback, an empty
buffer_callback and a donated identity jit over the same buffers (fixed costs), and
prepare_layer donated for several chunk budgets. Outputs checked against the reference.
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
from jax_nvfp4 import _bench, _prepare, _triton
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


def _launches_alone(spec, layer, res):
    src = [torch_bridge.to_torch(x) for x in layer]
    dst = [torch.empty_like(x) for x in src]
    stream = torch.cuda.current_stream().cuda_stream
    dev = src[0].device.index
    shapes = spec.shapes(padded=True)
    oop = K.plan(K.layer_launches(shapes, gated=True))
    ptrs = [t.data_ptr() for t in (*src, *dst)]
    res["launches_oop_ms"] = events(lambda: K.run(oop, tensors=None, pointers=ptrs,
                                                  stream=stream, device=dev))
    chunk = _prepare.experts_per_chunk(spec, None, None, w13_together=True)[0]
    scratch = torch.empty(_triton.scratch_bytes(spec, (chunk,)), dtype=torch.uint8,
                          device=src[0].device)
    ip = K.plan(K.layer_launches(shapes, gated=True, chunk=chunk))
    ptrs = [t.data_ptr() for t in (*dst, scratch)]
    res["launches_inplace_ms"] = events(lambda: K.run(ip, tensors=None, pointers=ptrs, stream=stream,
                                                      device=dev))
    res["launches_inplace_count"] = len(ip)
    res["copy_layer_ms"] = events(lambda: [d.copy_(s) for s, d in zip(src, dst)])


def profile(name, shape):
    e, h, i = shape
    spec = LayerSpec(e, h, i, True)
    layer = random_device_layer(jax.random.key(3), e, h, i, gated=True)
    ref = _bench.Reference(spec, layer)
    res = {}
    _launches_alone(spec, layer, res)
    torch.cuda.empty_cache()
    host = []
    run = K.run

    def timed_run(*a, **kw):
        t = time.perf_counter()
        run(*a, **kw)
        host.append(time.perf_counter() - t)
    K.run = timed_run
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
    K.run = run
    res["launch_mode"] = str(K._ARGS_MODE)
    for mib in (16, 32, 64, 128, 256):
        def call(*xs):
            return _prepare.prepare_layer(*xs, backend="triton", chunk_bytes=mib << 20)
        ref.check(call(*[_bench._copy(x) for x in layer]), f"chunk {mib}")
        res[f"donated_chunk_{mib}MiB_ms"] = med_ms(call, lambda: [_bench._copy(x) for x in layer])
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
