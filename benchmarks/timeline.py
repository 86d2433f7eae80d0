"""Where a ``prepare_layer`` call's wall clock goes (or ``prepare(params)``'s over a model),
from JAX's own profiler trace.

Each call runs inside a ``TraceAnnotation``; the trace (``jax.profiler.trace``, read back with
``jax.profiler.ProfileData``) then gives, per call, on one timeline: the call's start and
end on the host, the device's first and last activity (kernels, copies and memsets as CUPTI
records them) and the host events inside the call. Printed per shape, backend and donation,
as medians over the calls (ms):

* ``to first op``: call start to the device's first activity (planning, dispatch, launch);
* ``on device``: first activity start to last activity end (gaps included);
* ``after last op``: last activity end to the call's return (wait and wake-up, marks, deletes);
* the device's busy time (the sum of its activities) and each activity's name;
* the host events that took the most time inside the calls, and those that began after
  the device's last activity (what the call does once the device is done).

With ``--model LAYERS`` each call is ``prepare(params)`` over that many layers, against a loop
of ``prepare_layer`` over the same layers (donated, ``auto``).

Python functions show up as host events only with ``--python-tracer`` (which slows the host
several times over; off, the times are the calls' own).

On the GPU machine::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/timeline.py --shape qwen3-30b-a3b

On CPU it runs the same (no device plane: only the host side); a smoke test of the script.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

from jax_nvfp4 import layer as _layer  # noqa: E402
from jax_nvfp4 import testing as _testing  # noqa: E402
from jax_nvfp4.bench import layout as _bench  # noqa: E402
from jax_nvfp4.layout.spec import NAMES  # noqa: E402

# name: (E, H, I) gated, or (E, H, I, False): Nemotron-3-Nano is padded and not gated (its
# donated call is one program per array: transform.OneArrayAtATime).
SHAPES = {"tiny": (8, 256, 128), "qwen3-30b-a3b": (128, 2048, 768),
          "deepseek-v3-tp8": (256, 7168, 256), "nemotron-3-nano": (128, 2688, 1856, False)}


def _events(trace_dir):
    """(host events, device events) as (name, start_ns, end_ns) lists."""
    path, = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
    host, device = [], []
    for plane in data.planes:
        on_device = plane.name.startswith("/device:")
        if not (on_device or plane.name == "/host:CPU"):
            continue
        for line in plane.lines:
            # A device plane's summary lines ("XLA Modules", "XLA Ops", ...) repeat its
            # activities; its stream lines hold them once.
            if on_device and not line.name.startswith("Stream"):
                continue
            for e in line.events:
                (device if on_device else host).append(
                    (e.name, e.start_ns, e.start_ns + e.duration_ns))
    return host, device


def measure(shape, what: str, donate: bool, calls: int, python_tracer: bool = False,
            model: int = 0) -> dict:
    """The parts of ``calls`` calls of ``what``: a backend's ``prepare_layer``; with ``model``
    layers, ``"prepare"`` (``prepare(params)`` over them) or ``"loop"`` (``prepare_layer``
    over them), donated."""
    from jax_nvfp4.tree import prepare as _tree
    e, h, i, gated = (*shape, True)[:4]
    layer = jax.block_until_ready(_testing.random_device_layer(jax.random.key(1), e, h, i,
                                                               gated=gated))

    def args():
        if model:
            return jax.block_until_ready({f"layers.{k}": dict(zip(NAMES, [x.copy() for x in layer]))
                                          for k in range(model)})
        return jax.block_until_ready([x.copy() for x in layer]) if donate else list(layer)

    def call(a):
        if what == "prepare":
            return jax.block_until_ready(_tree.prepare(a, gated=gated))
        if what == "loop":
            return jax.block_until_ready({k: _layer.prepare_layer(*(v[n] for n in NAMES),
                                                                  gated=gated)
                                          for k, v in a.items()})
        return jax.block_until_ready(_layer.prepare_layer(*a, donate=donate, backend=what,
                                                          gated=gated))

    for _ in range(2 if model else 5):
        call(args())
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = int(python_tracer)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, profiler_options=options):
            for k in range(calls):
                a = args()  # (made outside the annotation: not part of the call)
                with jax.profiler.TraceAnnotation(f"jax_nvfp4 call {k}"):
                    call(a)
                del a
        host, device = _events(d)
    spans = sorted((s, t) for n, s, t in host if n.startswith("jax_nvfp4 call "))
    parts = collections.defaultdict(list)
    device_names, host_ms, after_ms = (collections.Counter() for _ in range(3))
    for s, t in spans:
        ops = [(n, a, b) for n, a, b in device if s <= a <= t]
        parts["call"].append((t - s) / 1e6)
        if ops:
            first, last = min(a for _, a, _ in ops), max(b for _, _, b in ops)
            parts["to first op"].append((first - s) / 1e6)
            parts["on device"].append((last - first) / 1e6)
            parts["after last op"].append((t - last) / 1e6)
            parts["device busy"].append(sum(b - a for _, a, b in ops) / 1e6)
            device_names.update(n for n, _, _ in ops)
        for n, a, b in host:
            if s <= a and b <= t and not n.startswith("jax_nvfp4 call "):
                host_ms[n] += (b - a) / 1e6 / len(spans)
                if ops and a >= last:
                    after_ms[n] += (b - a) / 1e6 / len(spans)
    out = {k: statistics.median(v) for k, v in parts.items()}
    out.update(shape=list(shape), what=what, donated=donate, calls=len(spans), model=model,
               device_ops={n: c / len(spans) for n, c in device_names.most_common()},
               host_top={n: ms for n, ms in host_ms.most_common(40)},
               host_after_last_op={n: ms for n, ms in after_ms.most_common(20)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES))
    p.add_argument("--backend", action="append", choices=("xla", "triton", "auto"))
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--model", type=int, default=0, metavar="LAYERS",
                   help="instead: prepare(params) over LAYERS layers of each shape, and a loop "
                        "of prepare_layer over them (donated)")
    p.add_argument("--python-tracer", action="store_true",
                   help="also trace Python functions (slows the host several times over)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    gpu = jax.devices()[0].platform == "gpu"
    backends = args.backend or (("xla", "triton") if gpu else ("xla",))
    rows = []
    runs = ([("prepare", True), ("loop", True)] if args.model else
            [(b, d) for b in backends for d in (True, False)])
    for name in args.shape or ["tiny", "qwen3-30b-a3b"]:
        for what, donate in runs:
            row = measure(SHAPES[name], what, donate, args.calls, args.python_tracer,
                          args.model)
            row["name"] = name
            rows.append(row)
            print(f"{name} {what} {'donated' if donate else 'not donated'}: " + ", ".join(
                f"{k} {row[k]:.3f}" for k in ("call", "to first op", "on device",
                                              "after last op", "device busy") if k in row))
            print("  device ops per call: " + "; ".join(
                f"{n[:60]} x{c:g}" for n, c in list(row["device_ops"].items())[:16]))
            print("  host ms per call: " + "; ".join(
                f"{n[:70]} {ms:.3f}" for n, ms in list(row["host_top"].items())[:12]))
            print("  host ms after the last op: " + "; ".join(
                f"{n[:70]} {ms:.3f}" for n, ms in list(row["host_after_last_op"].items())[:8]))
    if args.out:
        _bench.write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
