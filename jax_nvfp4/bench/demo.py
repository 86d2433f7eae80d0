"""``python -m jax_nvfp4 demo``: prepare a synthetic DeepSeek-V3-shaped layer, check and time it."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ..layout import reference as _reference
from ..layer import prepare_layer
from ..transform import free_bytes, plan_job, run_job
from ..layout.spec import SCALE_DTYPE, LayerSpec, check_arrays
from ..testing import random_device_layer


def configure(p):
    p.add_argument("--experts", type=int, default=None,
                   help="experts E (default: 8 on CPU, up to 256 to fit a GPU)")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size H (default 7168)")
    p.add_argument("--intermediate", type=int, default=2048,
                   help="intermediate size I per expert (default 2048)")
    p.add_argument("--not-gated", dest="gated", action="store_false",
                   help="w13 holds I rows (no gated activation)")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help="scratch budget of the in-place loop in MiB (default: 1/32 of the "
                        "layer, at least 64 MiB, at most 1/8 of free device memory)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")


def _default_experts(spec_for_one: LayerSpec, device) -> int:
    free = free_bytes(device)
    if free is None:
        return 8
    return int(max(1, min(256, 0.4 * free // spec_for_one.nbytes)))


def run(args) -> int:
    device = jax.devices()[0]
    one = LayerSpec(1, args.hidden, args.intermediate, args.gated)
    e = args.experts or _default_experts(one, device)
    spec = LayerSpec(e, args.hidden, args.intermediate, args.gated)
    seed = args.seed if args.seed is not None else int(time.time_ns() % 2**31)
    chunk_bytes = None if args.chunk_mib is None else int(args.chunk_mib * 2**20)
    print(f"device: {device.device_kind} ({device.platform})")
    print(f"layer: E={e} H={spec.hidden} I={spec.intermediate} gated={spec.gated}, "
          f"{spec.nbytes / 2**30:.3f} GiB, seed {seed}")
    abstract = [jax.ShapeDtypeStruct(s, d) for s, d in
                zip(spec.shapes(padded=False), (jnp.uint8, SCALE_DTYPE) * 2)]
    check_arrays(abstract, gated=spec.gated)  # refuse bad sizes before any work
    in_place = not spec.needs_padding

    # Warm up (compile) on one random layer, then time a second one.
    t0 = time.perf_counter()
    warmup = random_device_layer(jax.random.key(seed + 1), e, spec.hidden, spec.intermediate,
                                 gated=spec.gated)
    jax.block_until_ready(prepare_layer(*warmup, gated=spec.gated, chunk_bytes=chunk_bytes))
    first = time.perf_counter() - t0
    del warmup

    layer = random_device_layer(jax.random.key(seed), e, spec.hidden, spec.intermediate,
                                gated=spec.gated)
    # The reference runs on a few experts (all of them when small): it is numpy and slow.
    pick = np.unique(np.random.default_rng(seed).integers(0, e, size=min(e, 4)))
    host = [np.asarray(x).view(np.uint8)[pick] for x in layer]
    for x, name in zip(layer, ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")):
        print(f"  {name:17s} {str(x.dtype):14s} {list(x.shape)}")
    job = plan_job(layer, gated=spec.gated, donate=True, backend="auto",
                   chunk_bytes=chunk_bytes, inverse=False)
    scratch = (job.program.lower(*layer).compile().memory_analysis().temp_size_in_bytes
               if in_place else None)
    t0 = time.perf_counter()
    out = jax.block_until_ready(run_job(job))
    warm = time.perf_counter() - t0

    want = _reference.prepare_layer(*host, gated=spec.gated)
    bad = [n for n, o, w in zip(("w13", "w13_scale", "w2", "w2_scale"), out, want)
           if not np.array_equal(np.asarray(o).view(np.uint8)[pick], w)]
    moved = 2 * spec.nbytes  # each byte read once and written once
    how = ("in place" if in_place else
           f"padded to H={spec.padded_h}, I={spec.padded_i} (new buffers)")
    print(f"prepared {how}: {warm * 1e3:.2f} ms ({first * 1e3:.0f} ms for the first call, "
          f"with compilation), {moved / 2**30:.3f} GiB moved, {moved / warm / 1e9:.1f} GB/s")
    print(f"outputs: {[list(o.shape) for o in out]}")
    if in_place:
        print(f"extra device memory (XLA scratch): {scratch / 2**20:.1f} MiB "
              f"= {100 * scratch / spec.nbytes:.2f}% of the layer")
    print(f"inputs donated: {all(x.is_deleted() for x in layer)}")
    if bad:
        print(f"MISMATCH against the numpy reference in {bad} (experts {pick.tolist()})")
        return 1
    print(f"check: bit-exact against the independent numpy reference (experts {pick.tolist()})")
    return 0
