"""Where the triton backend's time goes, per shape and launch route (one CUDA GPU).

Per shape (unpadded; the bench's shape names):

- the planned launches alone, out of place and in place (CUDA events, no JAX), against
  torch's ``copy_`` of the same bytes: what the kernels cost;
- per route ("callback": ``buffer_callback``; "xla": jax-triton's custom call, where it
  imports), the jitted program's wall and device ms (the bench's ``device_time``),
  ``prepare_layer``'s wall ms, and the host time spent inside the callback;
- the fixed costs over the same buffers: an empty donated ``buffer_callback`` and a donated
  identity ``jit``;
- ``prepare_layer`` donated for several chunk budgets.

Every program's output is checked against the bench's reference before its time counts.
``python -m jax_nvfp4 bench`` measures the backends side by side; this script splits one
backend's time into its parts. On the GPU machine::

    python benchmarks/triton_profile.py --shape deepseek-v3-tp8 --out triton_profile.json

Without a CUDA device, torch or triton it says what is missing and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax

import jax_nvfp4
from jax_nvfp4 import transform as _prepare
from jax_nvfp4.backends.triton import kernels as K
from jax_nvfp4.backends.triton import program as _triton
from jax_nvfp4.bench import layout as bench
from jax_nvfp4.layout.spec import LayerSpec
from jax_nvfp4.testing import random_device_layer

DEFAULT_SHAPES = ("deepseek-v3-tp8", "qwen3-30b-a3b", "deepseek-v3")
CHUNK_MIB = (16, 32, 64, 128, 256)


def missing() -> str | None:
    """Why this script cannot run here (None when it can)."""
    if jax.devices()[0].platform != "gpu":
        return f"needs a CUDA GPU; JAX's default device is {jax.devices()[0].platform}"
    why = _triton.missing()
    if why:
        return why
    import torch
    if not torch.cuda.is_available():
        return "needs a CUDA build of torch (torch.cuda.is_available() is False)"
    return None


def _events_ms(fn, repeats):
    """Median ms between CUDA events around ``fn()`` on torch's current stream."""
    import torch
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


def _wall_ms(fn, make, repeats):
    return 1e3 * statistics.median(bench.time_jax(fn, make, repeats, warmup=2))


def _inplace_pointers(spec, buffers):
    """The in-place plan's pointers: ``buffers`` (the four arrays, then scratch), then the
    cycle table where gated w13 moves by cycle groups; and the table's tensor (or None),
    which must outlive the launches."""
    import torch
    table = _triton._cycles(spec)
    if table is not None:  # (a copy: the table is read-only, torch wants it writable)
        table = torch.as_tensor(table.copy(), device=buffers[0].device)
    return [t.data_ptr() for t in buffers] + ([] if table is None else [table.data_ptr()]), table


def _launches_alone(spec, layer, chunks, res, repeats):
    import torch

    import torch_bridge
    src = [torch_bridge.to_torch(x) for x in layer]
    dst = [torch.empty_like(x) for x in src]
    stream = torch.cuda.current_stream().cuda_stream
    dev = src[0].device.index
    oop = _triton._plan(spec, None)
    ptrs = [t.data_ptr() for t in (*src, *dst)]
    res["launches_oop_ms"] = _events_ms(
        lambda: K.run(oop, tensors=None, pointers=ptrs, stream=stream, device=dev), repeats)
    scratch = torch.empty(max(1, _triton.scratch_bytes(spec, chunks)), dtype=torch.uint8,
                          device=src[0].device)
    ip = _triton._plan(spec, chunks)
    ptrs, table = _inplace_pointers(spec, (*dst, scratch))
    res["launches_inplace_ms"] = _events_ms(
        lambda: K.run(ip, tensors=None, pointers=ptrs, stream=stream, device=dev), repeats)
    res["launches_inplace_count"] = len(ip)
    res["copy_layer_ms"] = _events_ms(lambda: [d.copy_(s) for s, d in zip(src, dst)], repeats)
    del src, dst, scratch, table
    torch.cuda.empty_cache()


# The settings of ``tiles`` tried by --tiles: how gated w13 moves in place in one pass (by
# whole rows: TILE_WHOLE, WHOLE_MIN_UNITS, WHOLE_WARPS; by cycle groups: CYCLE_TILE).
TILES = ({"CYCLES_OVER_WHOLE": False, "TILE_WHOLE": 16384, "WHOLE_MIN_UNITS": 8,
          "WHOLE_WARPS": 16},) + tuple(
    {"CYCLES_OVER_WHOLE": True, "CYCLE_TILE": t, "PACK_CYCLES": p}
    for t, p in ((8192, False), (4096, True), (8192, True), (16384, True)))


def tiles_sweep(name, repeats):
    """The in-place launches alone (CUDA events) for each ``TILES`` setting of the one-pass
    gated w13 program, each result checked byte for byte against the out-of-place launch."""
    import torch

    import torch_bridge
    from jax_nvfp4.backends.triton import tiles
    e, h, i, gated = bench.SHAPES[name]
    spec = LayerSpec(e, h, i, gated)
    if spec.needs_padding:
        raise SystemExit(f"{name}: a padded layer never moves in place; sweep an unpadded shape")
    layer = random_device_layer(jax.random.key(5), e, h, i, gated=gated)
    src = [torch_bridge.to_torch(x).view(torch.uint8) for x in layer]
    want = [torch.empty_like(x) for x in src]
    stream = torch.cuda.current_stream().cuda_stream
    dev = src[0].device.index
    K.run(_triton._plan(spec, None), tensors=None, pointers=[t.data_ptr() for t in (*src, *want)],
          stream=stream, device=dev)
    saved = {k: getattr(tiles, k) for setting in TILES for k in setting}
    rows = []
    try:
        for setting in TILES:
            for k, v in setting.items():
                setattr(tiles, k, v)
            row = {"shape": name, **setting, "one_pass": _triton.w13_in_one_pass(spec),
                   "by_cycles": tiles.w13_by_cycles(spec)}
            if setting["CYCLES_OVER_WHOLE"] and not row["by_cycles"]:
                continue  # no cycle groups for this shape: the same program as above
            chunks = _prepare.experts_per_chunk(
                spec, None, w13_together=not (row["one_pass"] or row["by_cycles"]))
            scratch = torch.empty(max(16, _triton.scratch_bytes(spec, chunks)),
                                  dtype=torch.uint8, device=src[0].device)
            work = [x.clone() for x in src]
            plan = _triton._plan(spec, chunks)
            ptrs, table = _inplace_pointers(spec, (*work, scratch))
            K.run(plan, tensors=None, pointers=ptrs, stream=stream, device=dev)
            torch.cuda.synchronize()
            row["bit_exact"] = all(torch.equal(a, b) for a, b in zip(work, want))
            row["inplace_ms"] = _events_ms(
                lambda: K.run(plan, tensors=None, pointers=ptrs, stream=stream, device=dev),
                repeats)  # (re-permutes each time: same work, other bytes)
            row["launches"] = len(plan)
            print("tiles", json.dumps(row), flush=True)
            rows.append(row)
            del work, scratch, table
    finally:
        for k, v in saved.items():
            setattr(tiles, k, v)
    copy = [torch.empty_like(x) for x in src]
    rows.append({"shape": name, "copy_layer_ms": _events_ms(
        lambda: [d.copy_(s) for s, d in zip(src, copy)], repeats)})
    print("tiles", json.dumps(rows[-1]), flush=True)
    del src, want, copy, layer
    torch.cuda.empty_cache()  # the next shape's random layer is drawn by XLA
    return rows


def _routes():
    return ["callback"] + (["xla"] if _triton.jax_triton_missing() is None else [])


def profile(name, repeats):
    import torch  # noqa: F401 - CUDA context for the events
    from jax.experimental.buffer_callback import buffer_callback
    e, h, i, gated = bench.SHAPES[name]
    spec = LayerSpec(e, h, i, gated)
    if spec.shapes(padded=True) != spec.shapes(padded=False):
        raise SystemExit(f"{name}: padded layers go out of place through XLA's pad first; "
                         "profile an unpadded shape")
    layer = random_device_layer(jax.random.key(3), e, h, i, gated=gated)
    ref = bench.Reference(spec, layer)
    res = {"shape": name, "E": e, "H": h, "I": i, "gated": gated}

    def fresh():
        return [bench._copy(x) for x in layer]

    job = _prepare.plan_job(layer, gated=gated, donate=True, backend="triton",
                            chunk_bytes=None, inverse=False)
    res["chunks"] = list(job.chunks)
    _launches_alone(spec, layer, job.chunks, res, repeats)
    host, run = [], K.run

    def timed_run(*a, **kw):
        t = time.perf_counter()
        run(*a, **kw)
        host.append(time.perf_counter() - t)

    try:
        K.run = timed_run
        for route, donate in ((r, d) for r in _routes() for d in (True, False)):
            with jax_nvfp4.options.override(triton_route=route):
                tag = f"{route}_{'donated' if donate else 'not_donated'}"
                job = _prepare.plan_job(layer, gated=gated, donate=donate, backend="triton",
                                        chunk_bytes=None, inverse=False)

                def make(donate=donate):
                    return fresh() if donate else list(layer)
                ref.check(job.program(*make()), tag)
                host.clear()
                res[f"program_{tag}_ms"] = _wall_ms(job.program, make, repeats)
                res[f"program_{tag}_device_ms"] = bench.device_time(job.program, donate, make,
                                                                    repeats)
                res[f"host_in_callback_{tag}_ms"] = (1e3 * statistics.median(host)
                                                     if host else None)
                res[f"prepare_layer_{tag}_ms"] = _wall_ms(
                    lambda *xs, d=donate: jax_nvfp4.prepare_layer(*xs, backend="triton",
                                                                  donate=d), make, repeats)
    finally:
        K.run = run
    res["launch_mode"] = str(K._ARGS_MODE)
    for mib in CHUNK_MIB:
        def call(*xs, mib=mib):
            return jax_nvfp4.prepare_layer(*xs, backend="triton", chunk_bytes=mib << 20)
        ref.check(call(*fresh()), f"chunk {mib} MiB")
        res[f"donated_chunk_{mib}MiB_ms"] = _wall_ms(call, fresh, repeats)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in layer]
    noop = jax.jit(lambda *xs: tuple(buffer_callback(
        lambda ctx, o, *a: None, shapes, input_output_aliases={0: 0, 1: 1, 2: 2, 3: 3})(*xs)),
        donate_argnums=(0, 1, 2, 3))
    res["empty_callback_donated_ms"] = _wall_ms(noop, fresh, repeats)
    ident = jax.jit(lambda *xs: xs, donate_argnums=(0, 1, 2, 3))
    res["identity_jit_donated_ms"] = _wall_ms(ident, fresh, repeats)
    print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                            for k, v in res.items()}), flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", choices=sorted(bench.SHAPES),
                   help=f"a bench shape, repeatable (default: {', '.join(DEFAULT_SHAPES)})")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--tiles", action="store_true",
                   help="only sweep the one-pass tile of gated w13 in place (TILES)")
    a = p.parse_args(argv)
    why = missing()
    if why:
        print(f"triton_profile.py: {why}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    shapes = a.shape or DEFAULT_SHAPES
    rows = ([r for n in shapes for r in tiles_sweep(n, a.repeats)] if a.tiles
            else [profile(n, a.repeats) for n in shapes])
    out = {"device": device.device_kind, "versions": bench.versions(), "commit": bench.commit(),
           "routes": _routes(), "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
