"""Variants of the XLA programs, timed side by side on one device (see NOTES.md).

Knobs: the weights' rows moved by Pallas kernels or XLA transposes
(``_prepare.PALLAS``), scales fused into one transpose or rows then swizzle
(``_prepare.FUSE_SCALES``), the in-place loop unrolled or a fori_loop
(``_prepare.UNROLL``), and the chunk budget. (Call 1 also tried uint32/uint64
element views: see NOTES.md.) Every variant's output is checked
against the device reference before its time is printed.

    python benchmarks/explore.py [--shape deepseek-v3 ...] [--out explore.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax

from jax_nvfp4 import _bench, _prepare
from jax_nvfp4._spec import LayerSpec


def _set(fuse, unroll, pallas):
    _prepare.FUSE_SCALES = fuse
    _prepare.UNROLL = unroll
    _prepare.PALLAS = pallas
    _prepare._compiled.cache_clear()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", action="append", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = jax.devices()[0]
    names = a.shape or ["deepseek-v3", "deepseek-v3-tp8"]
    bw = _bench.copy_bandwidth(device, (2 << 30) if device.platform != "cpu" else (1 << 24),
                               a.repeats)
    print(f"{device.device_kind}: copy {bw / 1e9:.0f} GB/s", flush=True)
    results = []
    for name in names:
        e, h, i = {**_bench.SHAPES, **_bench.CPU_SHAPES}[name]
        spec = LayerSpec(e, h, i, True)
        layer = _bench.random_layer(spec, jax.random.key(7), device)
        ref = _bench.Reference(spec, layer)
        floor = 2 * spec.nbytes / bw
        # Per array, out of place: where the time goes.
        for pallas in (False, True):
            _set(True, False, pallas)
            fns = _prepare._transforms(spec, False, "xla", pallas)
            for k, (fn, _) in enumerate(fns):
                if k in (1, 3) and pallas:
                    continue  # scales do not depend on pallas out of place
                s = _bench.time_jax(jax.jit(fn), lambda: (layer[k],), a.repeats)
                ms = 1e3 * statistics.median(s)
                results.append(dict(shape=name, what=f"array {k} out of place", pallas=pallas,
                                    ms=ms, x_floor=ms / (1e3 * 2 * layer[k].size / bw)))
                print(f"{name} array {k} pallas={pallas}: {ms:.3f} ms "
                      f"({results[-1]['x_floor']:.2f}x its floor)", flush=True)
        # Whole layer.
        configs = [(True, False, False, True, None), (True, False, False, False, None),
                   (True, False, True, True, None), (True, False, True, False, None),
                   (True, False, True, True, 4 * _prepare.MIN_CHUNK_BYTES),
                   (True, False, True, True, _prepare.MIN_CHUNK_BYTES // 2),
                   (False, False, True, True, None), (False, False, True, False, None)]
        for fuse, unroll, pallas, donate, cb in configs:
            _set(fuse, unroll, pallas)
            tag = f"fuse={fuse} pallas={pallas} donate={donate} cb={cb}"

            def make():
                return [_bench._copy(x) for x in layer] if donate else list(layer)

            def call(*xs):
                return _prepare.prepare_layer(*xs, backend="xla", donate=donate, chunk_bytes=cb)

            try:
                ref.check(call(*make()), "variant")
                s = _bench.time_jax(call, make, a.repeats)
                chunks = _prepare.experts_per_chunk(spec, cb, _prepare.free_bytes(next(iter(layer[0].devices()))))
                abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in layer]
                st = _prepare._compiled(spec, False, donate, chunks, "xla", pallas).lower(
                    *abstract).compile().memory_analysis()
                temp = st.temp_size_in_bytes
            except Exception as ex:  # noqa: BLE001 - report and go on
                print(f"{name} {tag}: FAILED {type(ex).__name__}: {str(ex)[:400]}", flush=True)
                continue
            ms = 1e3 * statistics.median(s)
            results.append(dict(shape=name, what="layer", fuse=fuse, pallas=pallas,
                                donate=donate, chunk_bytes=cb, ms=ms, x_floor=ms / 1e3 / floor,
                                temp=temp, temp_share=temp / spec.nbytes,
                                spread=(1e3 * min(s), 1e3 * max(s))))
            print(f"{name} layer {tag}: {ms:.3f} ms = {ms / 1e3 / floor:.2f}x floor "
                  f"[{1e3 * min(s):.2f}-{1e3 * max(s):.2f}], temp {temp / 2**20:.0f} MiB "
                  f"({temp / spec.nbytes:.1%})", flush=True)
        del layer, ref
    _set(True, False, True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=device.device_kind, copy_GBps=bw / 1e9, rows=results), f,
                      indent=1)


if __name__ == "__main__":
    main()
