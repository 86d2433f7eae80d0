"""Where the fixed cost of one ``prepare_layer`` call goes (wall clock, host side).

For each shape, backend and donation, in one run on one device, the median ms of:

* ``empty jit``: a jitted identity of the four arrays (donated when the call donates), waited
  for: JAX's dispatch floor for four buffers;
* ``free memory``: ``transform.free_bytes`` (``memory_stats``; what a donated call reads for
  its scratch budget);
* ``plan``: ``transform.plan_job`` (every check, the backend's choice, the program lookup);
* ``dispatch``: the planned program called, until it returns (not waited for);
* ``program``: the planned program called and waited for;
* ``prepare_layer``: the public call, waited for (plan + program + marks + deletes);
* ``device``: CUDA events around the program on XLA's stream (GPU with torch only).

Calls are interleaved round by round (every measurement once per round), so drift in the
machine's state lands on all of them alike.

On the GPU machine::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/fixed_cost.py --out fixed.json

On CPU it runs the same measurements (xla only; a smoke test of the script).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from jax_nvfp4 import layer as _layer  # noqa: E402
from jax_nvfp4 import testing as _testing  # noqa: E402
from jax_nvfp4 import transform as _transform  # noqa: E402
from jax_nvfp4.bench import layout as _bench  # noqa: E402

# name: (E, H, I) gated, or (E, H, I, False): Nemotron-3-Nano is padded and not gated (its
# donated call is one program per array: transform.OneArrayAtATime).
SHAPES = {"tiny": (8, 256, 128), "qwen3-30b-a3b-tp8-unpadded": (128, 2048, 128),
          "qwen3-30b-a3b": (128, 2048, 768), "deepseek-v3-tp8": (256, 7168, 256),
          "nemotron-3-nano": (128, 2688, 1856, False)}


def _copies(layer):
    return jax.block_until_ready([x.copy() for x in layer])


def measure(shape, backend: str, donate: bool, rounds: int) -> dict:
    e, h, i, gated = (*shape, True)[:4]
    layer = jax.block_until_ready(_testing.random_device_layer(jax.random.key(1), e, h, i,
                                                               gated=gated))
    make = (lambda: _copies(layer)) if donate else (lambda: list(layer))
    plan = dict(gated=gated, donate=donate, backend=backend, chunk_bytes=None, inverse=False)
    job = _transform.plan_job(make(), **plan)
    empty = jax.jit(lambda *xs: xs, donate_argnums=(0, 1, 2, 3) if donate else ())

    def t_empty(a):
        jax.block_until_ready(empty(*a))

    device = next(iter(layer[0].devices()))

    def t_free(a):
        _transform.free_bytes(device)

    def t_plan(a):
        _transform.plan_job(a, **plan)

    def t_dispatch(a):
        out = job.program(*a)
        t = time.perf_counter()
        jax.block_until_ready(out)
        return t  # the wait is not this measurement's

    def t_program(a):
        jax.block_until_ready(job.program(*a))

    def t_call(a):
        jax.block_until_ready(_layer.prepare_layer(*a, gated=gated, donate=donate,
                                                   backend=backend))

    steps = {"empty jit": t_empty, "free memory": t_free, "plan": t_plan, "dispatch": t_dispatch,
             "program": t_program, "prepare_layer": t_call}
    samples = {k: [] for k in steps}
    for r in range(3 + rounds):
        for name, fn in steps.items():
            args = make()
            t0 = time.perf_counter()
            end = fn(args)
            t1 = end if isinstance(end, float) else time.perf_counter()
            if r >= 3:
                samples[name].append(t1 - t0)
            del args
    out = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    out["device"] = _bench.device_time(job.program, donate, make, rounds)
    out.update(shape=list(shape), backend=backend, resolved=job.backend, donated=donate,
               rounds=rounds)
    return out


def _profile(backend: str, top: int) -> None:
    import cProfile
    import pstats

    layer = jax.block_until_ready(_testing.random_device_layer(jax.random.key(2), 8, 256, 128))
    argss = [_copies(layer) for _ in range(210)]
    for a in argss[:10]:
        jax.block_until_ready(_layer.prepare_layer(*a, backend=backend))
    prof = cProfile.Profile()
    prof.enable()
    for a in argss[10:]:
        jax.block_until_ready(_layer.prepare_layer(*a, backend=backend))
    prof.disable()
    print(f"--- cProfile: 200 tiny donated prepare_layer calls, backend={backend}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--shape", action="append", choices=sorted(SHAPES))
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print cProfile's top N functions (own time) of 200 donated "
                        "tiny prepare_layer calls per backend")
    args = p.parse_args(argv)
    gpu = jax.devices()[0].platform == "gpu"
    backends = ("xla", "triton", "auto") if gpu else ("xla",)
    rows = []
    for name in args.shape or list(SHAPES)[:3]:  # (DeepSeek-V3 TP8: 0.75 GB, when asked)
        for backend in backends:
            for donate in (True, False):
                row = measure(SHAPES[name], backend, donate, args.rounds)
                row["name"] = name
                rows.append(row)
                print(f"{name} {backend}->{row['resolved']} "
                      f"{'donated' if donate else 'not donated'}: " + ", ".join(
                          f"{k} {row[k]:.3f}" for k in ("empty jit", "free memory", "plan",
                                                        "dispatch", "program", "prepare_layer")
                      ) + ("" if row["device"] is None else f", device {row['device']:.3f}"),
                      flush=True)
    if args.profile:
        for backend in backends:
            _profile(backend, args.profile)
    if args.out:
        _bench.write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
