"""Triton backend on one GPU: kernel variants and chunk sizes (issue 7 exploration).

Times each kernel alone on DeepSeek-V3-sized arrays (torch events, median of 10 after
warm-up) against torch's copy_ of the same bytes, and prepare_layer(backend="triton")
donated for several chunk budgets. Every output is checked against the XLA backend first.
"""

from __future__ import annotations

import json
import statistics
import sys

import jax
import jax.numpy as jnp
import torch

import torch_bridge
from jax_nvfp4 import _prepare, _triton_kernels as K
from jax_nvfp4._bench import Reference, time_jax, _copy
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


def main(shape=(256, 7168, 2048), out_path=None):
    e, h, i = shape
    spec = LayerSpec(e, h, i, True)
    layer = random_device_layer(jax.random.key(7), e, h, i, gated=True, device=jax.devices()[0])
    ref = Reference(spec, layer)
    res = {"shape": shape}
    src = [torch_bridge.to_torch(x) for x in layer]
    want = [torch_bridge.to_torch(x) for x in ref.out]
    names = ("w13", "s13", "w2", "s2")
    for k, name in enumerate(names):
        x = src[k]
        dst = torch.empty_like(x)
        copy_ms = events(lambda: dst.copy_(x))
        move = K.move_rows if k in (0, 2) else K.move_scales
        gated = k < 2
        move(x, dst, gated=gated)
        assert torch.equal(dst, want[k]), name
        ms = events(lambda: move(x, dst, gated=gated))
        row = dict(bytes=x.numel(), copy_ms=copy_ms, out_of_place_ms=ms)
        if not gated:
            y = x.clone()
            move(y, y, gated=False, in_place=True)
            assert torch.equal(y, want[k]), name + " in place"
            row["in_place_ms"] = events(lambda: move(y, y, gated=False, in_place=True))
        else:
            for mib in (16, 64, 256):
                per = x[0].numel()
                chunk = max(1, (mib << 20) // per)
                scratch = torch.empty(chunk * per, dtype=torch.uint8, device=x.device)
                y = x.clone()
                K.move_gated_in_place(y, scratch, chunk=chunk, move=move)
                assert torch.equal(y, want[k]), name + " in place"
                row[f"in_place_{mib}MiB_ms"] = events(
                    lambda: K.move_gated_in_place(y, scratch, chunk=chunk, move=move))
                del scratch, y
        res[name] = row
        print(name, row, flush=True)
        del dst
    del src, want
    torch.cuda.empty_cache()
    for mib in (None, 32, 64, 128, 256, 512):
        cb = None if mib is None else mib << 20

        def call(*xs):
            return _prepare.prepare_layer(*xs, backend="triton", donate=True, chunk_bytes=cb)
        out = call(*[_copy(x) for x in layer])
        ref.check(out, f"triton chunk {mib}")
        del out
        ms = 1e3 * statistics.median(time_jax(call, lambda: [_copy(x) for x in layer], 10))
        res[f"layer_donated_{mib}MiB_ms"] = ms
        print("layer donated chunk", mib, "MiB:", round(ms, 3), "ms", flush=True)
    if out_path:
        json.dump(res, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(out_path=sys.argv[1] if len(sys.argv) > 1 else None)
