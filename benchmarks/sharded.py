"""Prepare one expert-sharded MoE layer over all devices: exactness, per-device memory and time.

A DeepSeek-V3-sized layer (E=256, H=7168, I=2048; E scaled down if it does not fit)
is made on the devices with ``NamedSharding(mesh, P("expert"))`` and prepared in place
(donated). For each device count k (1, 2, 4, ... up to --devices) it reports the
time of ``prepare_layer`` and the peak extra memory of every device over its shard,
polled from ``device.memory_stats()["bytes_in_use"]`` in a thread, against the
largest chunk of the in-place loop. A first row runs E/n experts on one device:
the same bytes per device as the full sharding, so its time is what the sharded
run should take. The layer sharded over all devices is checked byte for byte,
shard by shard, against the same layer prepared on one device, and one expert of
every shard against the independent numpy reference.

On the GPU machine::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/sharded.py --out sharded.json

A quick CPU try-out with virtual devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/sharded.py --small
"""

from __future__ import annotations

import os

# Before JAX's first operation: allocate on demand, so bytes_in_use is the live data.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding  # noqa: E402

import jax_nvfp4  # noqa: E402
from jax_nvfp4 import transform as _prepare  # noqa: E402
from jax_nvfp4.backends import select  # noqa: E402
from jax_nvfp4.layout import reference as _reference  # noqa: E402
from jax_nvfp4.layout.spec import NAMES, SCALE_DTYPE, LayerSpec  # noqa: E402


def _hash_bytes(shape, seed: int):
    """Pseudo-random uint8 of ``shape``: a 32-bit integer hash of each element's index.

    One fused elementwise kernel (compiles in a blink, unlike jax.random on CPU) whose
    values do not depend on how the output is sharded.
    """
    e, r, c = (jax.lax.broadcasted_iota(jnp.uint32, shape, k) for k in range(3))
    x = e * jnp.uint32(0x9E3779B1) + r * jnp.uint32(0x85EBCA77) + c * jnp.uint32(0xC2B2AE3D)
    x = x ^ jnp.uint32(seed & 0xFFFFFFFF)
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # lowbias32
        x = (x ^ (x >> shift)) * jnp.uint32(mul)
    return (x ^ (x >> 16)).astype(jnp.uint8)


def _gen(spec: LayerSpec, seed: int, sharding):
    """Random bytes of one layer placed by ``sharding``; the same bytes for any sharding."""
    def make():
        out = [_hash_bytes(s, seed + 7919 * k) for k, s in enumerate(spec.shapes(padded=False))]
        out[1], out[3] = (jax.lax.bitcast_convert_type(x, SCALE_DTYPE) for x in (out[1], out[3]))
        return out
    return jax.block_until_ready(jax.jit(make, out_shardings=sharding)())


class _Poller:
    """Peak ``bytes_in_use`` of each device while active (None where the platform has no stats)."""

    def __init__(self, devices):
        self.devices = devices
        self.base = [self._used(d) for d in devices]
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _used(device):
        stats = device.memory_stats()
        return None if not stats else stats.get("bytes_in_use")

    def _run(self):
        while not self._stop.is_set():
            for k, d in enumerate(self.devices):
                used = self._used(d)
                if used is not None and used > self.peak[k]:
                    self.peak[k] = used
            time.sleep(0.0002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for k, d in enumerate(self.devices):  # the last word, after the work finished
            used = self._used(d)
            if used is not None and used > self.peak[k]:
                self.peak[k] = used

    def extra(self):
        return [None if b is None else p - b for b, p in zip(self.base, self.peak)]


def _sharding_for(devices):
    if len(devices) == 1:
        return SingleDeviceSharding(devices[0])
    return NamedSharding(jax.make_mesh((len(devices),), ("expert",), devices=devices),
                         P("expert"))


def _job(layer, gated, chunk_bytes, backend):
    """The validated, compiled call prepare_layer makes (chunks and program per device)."""
    return _prepare.plan_job(layer, gated=gated, donate=True, backend=backend,
                             chunk_bytes=chunk_bytes, inverse=False)


def _largest_chunk(job):
    return max(c * s[1] * s[2] for c, s in zip(job.chunks, job.spec.shapes(padded=False)))


def _scratch(job):
    """temp_size_in_bytes of the compiled per-device program (XLA's own figure)."""
    return job.program.lower(*job.arrays).compile().memory_analysis().temp_size_in_bytes


def _row(spec: LayerSpec, devices, args, seed):
    """Time and memory of prepare_layer (donated) of ``spec`` over ``devices``."""
    sharding = _sharding_for(devices)
    local = LayerSpec(spec.experts // len(devices), spec.hidden, spec.intermediate, spec.gated)
    layer = _gen(spec, seed, sharding)
    job = _job(layer, spec.gated, args.chunk_bytes, args.backend)
    chunks, chunk, scratch = job.chunks, _largest_chunk(job), _scratch(job)
    del job
    kw = dict(backend=args.backend, chunk_bytes=args.chunk_bytes)
    t0 = time.perf_counter()
    layer = jax_nvfp4.unprepare_layer(*jax.block_until_ready(jax_nvfp4.prepare_layer(*layer, **kw)),
                                      **kw)
    jax.block_until_ready(layer)
    warmup = time.perf_counter() - t0
    prep, unprep = [], []
    with _Poller(devices) as poll:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(jax_nvfp4.prepare_layer(*layer, **kw))
            prep.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            layer = jax.block_until_ready(jax_nvfp4.unprepare_layer(*out, **kw))
            unprep.append(time.perf_counter() - t0)
    extra = poll.extra()
    per_device = spec.nbytes // len(devices)
    t = statistics.median(prep)
    row = {
        "devices": len(devices), "experts": spec.experts, "experts_per_device": local.experts,
        "bytes_per_device": per_device, "chunks": list(chunks), "largest_chunk_bytes": chunk,
        "xla_scratch_bytes": scratch, "peak_extra_bytes": extra,
        "prepare_s": prep, "unprepare_s": unprep, "prepare_median_s": t,
        "unprepare_median_s": statistics.median(unprep), "warmup_s": warmup,
        "gb_per_s_per_device": per_device / t / 1e9,
    }
    return row, layer


def _check(spec: LayerSpec, devices, args, seed, layer):
    """The layer sharded over ``devices`` vs the same layer on one device, and vs numpy."""
    kw = dict(backend=args.backend, chunk_bytes=args.chunk_bytes)
    shardings = [x.sharding for x in layer]
    backend = select.resolve_backend(args.backend, layer)
    out = jax_nvfp4.prepare_layer(*layer, **kw)
    src = _gen(spec, seed, SingleDeviceSharding(devices[0]))
    # One expert of every shard (its first) goes to the independent numpy reference.
    starts = sorted({s.index[0].start or 0 for s in out[0].addressable_shards})
    host = {e: [np.asarray(x[e:e + 1]).view(np.uint8) for x in src] for e in starts}
    ref = jax_nvfp4.prepare_layer(*src, **kw)
    del src
    bad, shards = [], 0
    for name, o, r in zip(NAMES, out, ref):
        r = np.asarray(r).view(np.uint8)  # on the host: no device program per shard shape
        for shard in o.addressable_shards:
            shards += 1
            if not np.array_equal(np.asarray(shard.data).view(np.uint8), r[shard.index]):
                bad.append(f"{name} shard {shard.index} on {shard.device}")
    del ref, r
    for e in starts:
        want = _reference.prepare_layer(*host[e], gated=spec.gated)
        for name, o, w in zip(NAMES, out, want):
            # from the shard itself: indexing a sharded array may need collectives
            shard = next(s for s in o.addressable_shards if (s.index[0].start or 0) == e)
            if not np.array_equal(np.asarray(shard.data[:1]).view(np.uint8), w):
                bad.append(f"{name} expert {e} vs numpy reference")
    return {"exact": not bad, "mismatches": bad, "shards_compared": shards,
            "experts_vs_numpy": starts, "backend_resolved": backend,
            "sharding_kept": [o.sharding for o in out] == shardings}


def _fit_experts(spec: LayerSpec, n: int, devices) -> int:
    """Largest E <= spec.experts (a multiple of n) whose check fits device 0: shard + layer."""
    stats = devices[0].memory_stats()
    e = spec.experts
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        per_expert = LayerSpec(1, spec.hidden, spec.intermediate, spec.gated).nbytes
        while e > n and (e + e // n) * per_expert > 0.6 * free:
            e //= 2
    return max(n, e - e % n)


def _table(rows):
    head = (f"{'devices':>7} {'E':>5} {'E/dev':>6} {'GiB/dev':>8} {'prepare ms':>11} "
            f"{'unprep ms':>10} {'GB/s/dev':>9} {'chunk MiB':>10} {'XLA tmp MiB':>12} "
            f"{'peak extra MiB per device':>26}")
    lines = [head, "-" * len(head)]
    mib = 2 ** 20
    for r in rows:
        extra = " ".join("-" if x is None else f"{x / mib:.1f}" for x in r["peak_extra_bytes"])
        lines.append(
            f"{r['devices']:>7} {r['experts']:>5} {r['experts_per_device']:>6} "
            f"{r['bytes_per_device'] / 2**30:>8.3f} {r['prepare_median_s'] * 1e3:>11.2f} "
            f"{r['unprepare_median_s'] * 1e3:>10.2f} {r['gb_per_s_per_device']:>9.1f} "
            f"{r['largest_chunk_bytes'] / mib:>10.1f} {r['xla_scratch_bytes'] / mib:>12.1f} "
            f"{extra:>26}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--experts", type=int, default=256, help="experts E (default 256)")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size H (default 7168)")
    p.add_argument("--intermediate", type=int, default=2048, help="intermediate I (default 2048)")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help="scratch budget of the in-place loop (default: the library's)")
    p.add_argument("--backend", default="auto", help="prepare_layer backend (default auto)")
    p.add_argument("--repeats", type=int, default=5, help="timed prepare/unprepare cycles")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.add_argument("--small", action="store_true",
                   help="a tiny layer (E=16, H=256, I=128, 2 repeats), for CPU smoke tests")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.small:
        args.experts, args.hidden, args.intermediate, args.repeats = 16, 256, 128, 2
    args.chunk_bytes = None if args.chunk_mib is None else int(args.chunk_mib * 2**20)
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    n = len(devices)
    seed = args.seed if args.seed is not None else int(time.time_ns() % 2**31)
    spec = LayerSpec(args.experts, args.hidden, args.intermediate, True)
    spec = LayerSpec(_fit_experts(spec, n, devices), spec.hidden, spec.intermediate, True)
    if spec.experts % n:
        raise SystemExit(f"--experts {spec.experts} must be divisible by the {n} devices")
    print(f"{n} x {devices[0].device_kind} ({devices[0].platform}), jax {jax.__version__}; "
          f"layer E={spec.experts} H={spec.hidden} I={spec.intermediate}: "
          f"{spec.nbytes / 2**30:.2f} GiB, seed {seed}", flush=True)

    rows = []
    per_device = LayerSpec(spec.experts // n, spec.hidden, spec.intermediate, True)
    counts = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n and n % k == 0 and
              spec.experts % k == 0]
    if n not in counts:
        counts.append(n)
    plan = [(per_device, 1)] + [(spec, k) for k in counts if (spec, k) != (per_device, 1)]
    print(_table([]), flush=True)
    layer = None
    for s, k in plan:
        del layer
        row, layer = _row(s, devices[:k], args, seed)
        rows.append(row)
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    check = _check(spec, devices, args, seed, layer)
    del layer
    result = {
        "device_kind": devices[0].device_kind, "platform": devices[0].platform,
        "device_count": n, "jax": jax.__version__, "backend": args.backend,
        "layer": {"experts": spec.experts, "hidden": spec.hidden,
                  "intermediate": spec.intermediate, "bytes": spec.nbytes},
        "seed": seed, "rows": rows, "check": check,
    }
    print()
    print(_table(rows))
    print(f"\nsharded over {n}: {'bit-exact' if check['exact'] else 'MISMATCH'} "
          f"({check['shards_compared']} shards vs one device; experts {check['experts_vs_numpy']} "
          f"vs numpy), sharding kept: {check['sharding_kept']}")
    for bad in check["mismatches"]:
        print("  mismatch:", bad)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0 if check["exact"] and check["sharding_kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
