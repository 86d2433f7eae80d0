"""Host timeline of one triton-backend call (issue 7 exploration): where ~0.5 ms goes.

Marks (perf_counter, ms after the call starts): callback entered, launches queued,
callback left, result ready; and the GPU time between events recorded on XLA's stream
at the callback's start and end. Also: the same program with a callback that
launches nothing, and one that only records the events.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import torch

from jax_nvfp4 import _bench, _prepare
from jax_nvfp4 import _triton_kernels as K
from jax_nvfp4.testing import random_device_layer


def timeline(name, shape, donate):
    e, h, i = shape
    layer = random_device_layer(jax.random.key(3), e, h, i, gated=True)
    marks = {}
    run = K.run

    def traced(launches, **kw):
        marks["cb_in"] = time.perf_counter()
        s = torch.cuda.ExternalStream(kw["stream"])
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record(s)
        if marks.get("mode") != "none":
            run(launches, **kw)
        ev1.record(s)
        marks["events"] = (ev0, ev1)
        marks["cb_out"] = time.perf_counter()
    K.run = traced
    job = _prepare.plan_job(layer, gated=True, donate=donate, backend="triton",
                            chunk_bytes=None, inverse=False)
    rows = {}
    for mode in ("launch", "none"):
        marks["mode"] = mode
        samples = []
        for k in range(12):
            args = jax.block_until_ready([_bench._copy(x) for x in layer] if donate else layer)
            t0 = time.perf_counter()
            out = job.program(*args)
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            t2 = time.perf_counter()
            ev0, ev1 = marks["events"]
            ev1.synchronize()
            if k >= 2:
                samples.append(dict(dispatch_returned=1e3 * (t1 - t0),
                                    cb_in=1e3 * (marks["cb_in"] - t0),
                                    cb_out=1e3 * (marks["cb_out"] - t0),
                                    ready=1e3 * (t2 - t0), gpu=ev0.elapsed_time(ev1)))
            del out, args
        rows[mode] = {k: round(statistics.median(s[k] for s in samples), 4) for k in samples[0]}
    K.run = run
    print(name, "donated" if donate else "not donated", json.dumps(rows), flush=True)
    return rows


if __name__ == "__main__":
    out = {}
    for n in ("deepseek-v3-tp8", "qwen3-30b-a3b"):
        for donate in (False, True):
            out[f"{n} {donate}"] = timeline(n, _bench.SHAPES[n], donate)
    if len(sys.argv) > 1:
        json.dump(out, open(sys.argv[1], "w"), indent=1)
