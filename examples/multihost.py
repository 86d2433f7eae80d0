"""Prepare an expert-sharded layer in a multi-process ``jax.distributed`` job.

Every process runs the same program on the same global arrays; each prepares only
the shards on its own devices (nothing crosses processes). Run it as one process
per host, e.g. on two hosts::

    python examples/multihost.py --coordinator host0:12345 --num-processes 2 --process-id 0
    python examples/multihost.py --coordinator host0:12345 --num-processes 2 --process-id 1

or try it on one machine, two CPU processes over localhost::

    python examples/multihost.py --launch 2

Each process checks its own shards against the numpy reference and prints ``OK``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def _child(args) -> int:
    import jax

    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)

    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_nvfp4
    from jax_nvfp4.layout import reference as _reference
    from jax_nvfp4.testing import random_layer

    # The same host bytes in every process (same seed); each builds only its own shards.
    host = random_layer(np.random.default_rng(args.seed), args.experts, 256, 128)
    host[1], host[3] = (h.view(jax.numpy.float8_e4m3fn) for h in (host[1], host[3]))
    mesh = jax.make_mesh((jax.device_count(),), ("expert",))
    sharding = NamedSharding(mesh, P("expert"))
    layer = [jax.make_array_from_callback(h.shape, sharding, lambda idx, h=h: h[idx])
             for h in host]

    out = jax_nvfp4.prepare_layer(*layer)  # the same call in every process

    want = _reference.prepare_layer(*(h.view(np.uint8) for h in host))
    for o, w in zip(out, want):
        assert o.sharding == sharding
        for shard in o.addressable_shards:
            assert shard.device.process_index == jax.process_index()
            got = np.asarray(shard.data).view(np.uint8)
            assert np.array_equal(got, w[shard.index]), f"shard {shard.index} differs"
    local = sorted(s.index[0].start for s in out[0].addressable_shards)
    print(f"process {jax.process_index()}/{jax.process_count()}: experts from {local} of "
          f"{args.experts} on {len(jax.local_devices())} local devices, "
          f"{jax.device_count()} in all: OK", flush=True)
    jax.distributed.shutdown()
    return 0


def _launch(args) -> int:
    """Start ``args.launch`` local CPU processes and wait for them."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, os.path.abspath(__file__), "--coordinator", f"localhost:{port}",
           "--num-processes", str(args.launch), "--cpu-devices", str(args.cpu_devices or 2),
           "--experts", str(args.experts), "--seed", str(args.seed)]
    procs = [subprocess.Popen(cmd + ["--process-id", str(k)]) for k in range(args.launch)]
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        print(f"timed out after {args.timeout} s", file=sys.stderr)
        return 1
    return max(codes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--launch", type=int, metavar="N",
                   help="start N local CPU processes instead (a try-out on one machine)")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="run on CPU with this many devices per process (default: the "
                        "platform's devices; 2 with --launch)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120, help="seconds, with --launch")
    args = p.parse_args(argv)
    return _launch(args) if args.launch else _child(args)


if __name__ == "__main__":
    sys.exit(main())
