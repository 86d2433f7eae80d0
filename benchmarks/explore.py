"""Variants of the XLA programs, timed side by side on one device (see NOTES.md).

Knobs: element width of the transposes (``_layout.MAX_UNIT_BYTES``: 1 = uint8,
4 = uint32, 8 = uint64 under x64), scales fused into one transpose or rows then
swizzle (``_prepare.FUSE_SCALES``), the in-place loop unrolled or a fori_loop
(``_prepare.UNROLL``), and the chunk budget. Every variant's output is checked
against the device reference before its time is printed.

    python benchmarks/explore.py [--shape deepseek-v3 ...] [--out explore.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import jax

from jax_nvfp4 import _bench, _layout, _prepare
from jax_nvfp4._spec import LayerSpec


def _set(w, fuse, unroll):
    jax.config.update("jax_enable_x64", w == 8)
    _layout.MAX_UNIT_BYTES = w
    _prepare.FUSE_SCALES = fuse
    _prepare.UNROLL = unroll
    _prepare._compiled.cache_clear()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", action="append", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = jax.devices()[0]
    names = a.shape or ["deepseek-v3", "deepseek-v3-tp8"]
    bw = _bench.copy_bandwidth(device, (2 << 30) if device.platform != "cpu" else (1 << 24), a.repeats)
    print(f"{device.device_kind}: copy {bw / 1e9:.0f} GB/s", flush=True)
    results = []
    for name in names:
        e, h, i = {**_bench.SHAPES, **_bench.CPU_SHAPES}[name]
        spec = LayerSpec(e, h, i, True)
        layer = _bench.random_layer(spec, jax.random.key(7), device)
        ref = _bench.Reference(spec, layer)
        floor = 2 * spec.nbytes / bw
        # Per array, out of place, by element width: where the time goes.
        for w, fuse in itertools.product((1, 4, 8), (True, False)):
            _set(w, fuse, False)
            fns = _prepare._transforms(spec, False, "xla")
            for k, (fn, _) in enumerate(fns):
                if k in (0, 2) and not fuse:
                    continue  # weights do not depend on fuse
                f = jax.jit(fn)
                s = _bench.time_jax(f, lambda: (layer[k],), a.repeats)
                nbytes = layer[k].size
                ms = 1e3 * statistics.median(s)
                results.append(dict(shape=name, what=f"array {k} out of place", w=w, fuse=fuse,
                                    ms=ms, x_floor=ms / (1e3 * 2 * nbytes / bw)))
                print(f"{name} array {k} w={w} fuse={fuse}: {ms:.3f} ms "
                      f"({results[-1]['x_floor']:.2f}x its floor)", flush=True)
        # Whole layer.
        configs = [(w, fuse, unroll, donate, cb)
                   for w in (1, 4, 8) for fuse in (True, False) for unroll in (False, True)
                   for donate in (True, False) for cb in (None, 4 * _prepare.MIN_CHUNK_BYTES)
                   if (donate or (not unroll and cb is None)) and (fuse or w == 4)
                   and (cb is None or (w == 4 and fuse))]
        for w, fuse, unroll, donate, cb in configs:
            _set(w, fuse, unroll)

            def make():
                return [_bench._copy(x) for x in layer] if donate else list(layer)

            def call(*xs):
                return _prepare.prepare_layer(*xs, backend="xla", donate=donate, chunk_bytes=cb)

            try:
                ref.check(call(*make()), "variant")
                s = _bench.time_jax(call, make, a.repeats)
                chunks = _prepare.experts_per_chunk(spec, cb, _prepare.free_bytes(layer[0]))
                abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in layer]
                st = _prepare._compiled(spec, False, donate, chunks, "xla").lower(
                    *abstract).compile().memory_analysis()
                temp = st.temp_size_in_bytes
            except Exception as ex:  # noqa: BLE001 - report and go on
                print(f"{name} w={w} fuse={fuse} unroll={unroll} donate={donate} cb={cb}: "
                      f"FAILED {type(ex).__name__}: {str(ex)[:300]}", flush=True)
                continue
            ms = 1e3 * statistics.median(s)
            results.append(dict(shape=name, what="layer", w=w, fuse=fuse, unroll=unroll,
                                donate=donate, chunk_bytes=cb, ms=ms, x_floor=ms / 1e3 / floor,
                                temp=temp, temp_share=temp / spec.nbytes, spread=(
                                    1e3 * min(s), 1e3 * max(s))))
            print(f"{name} layer w={w} fuse={fuse} unroll={unroll} donate={donate} cb={cb}: "
                  f"{ms:.3f} ms = {ms / 1e3 / floor:.2f}x floor, temp {temp / 2**20:.0f} MiB "
                  f"({temp / spec.nbytes:.1%})", flush=True)
        del layer, ref
    _set(4, True, False)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=device.device_kind, copy_GBps=bw / 1e9, rows=results), f,
                      indent=1)


if __name__ == "__main__":
    main()
