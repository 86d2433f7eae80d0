"""python -m jax_nvfp4: help and the demo."""

from __future__ import annotations

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "jax_nvfp4", *args], capture_output=True,
                          text=True, timeout=600)


def test_help_lists_commands():
    r = _run("--help")
    assert r.returncode == 0 and "demo" in r.stdout
    r = _run("demo", "--help")
    assert r.returncode == 0 and "--experts" in r.stdout


def test_demo_small_layer_checks_against_reference():
    r = _run("demo", "--experts", "3", "--hidden", "256", "--intermediate", "128")
    assert r.returncode == 0, r.stderr
    assert "bit-exact against the independent numpy reference" in r.stdout
    assert "inputs donated: True" in r.stdout


def test_demo_bad_size_is_an_error_without_traceback():
    r = _run("demo", "--experts", "2", "--hidden", "200", "--intermediate", "128")
    assert r.returncode == 2
    assert "must be a multiple of 128" in r.stderr and "Traceback" not in r.stderr
