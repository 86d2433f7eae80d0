"""Two jax.distributed processes on CPU over localhost: each prepares only its own shards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_prepare_their_own_experts():
    path = [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))  # this checkout's jax_nvfp4
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multihost.py"), "--launch", "2",
         "--experts", "8", "--seed", str(int.from_bytes(os.urandom(4), "little"))],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Both processes write to one pipe, so their lines may come interleaved: find each.
    lines = sorted(re.findall(r"process \d/2: [^\n]*? in all: OK", run.stdout))
    assert lines == [
        "process 0/2: experts from [0, 2] of 8 on 2 local devices, 4 in all: OK",
        "process 1/2: experts from [4, 6] of 8 on 2 local devices, 4 in all: OK",
    ], run.stdout + run.stderr
