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
    assert "must be a multiple of" in r.stderr and "Traceback" not in r.stderr  # H % 16 or 128


def test_errors_and_signals_map_to_exit_codes(monkeypatch, capsys):
    # safetensors' errors are not OSError; they are I/O the user can act on: exit 2.
    # A terminating signal turned into Interrupted exits 128 + signum, like the shell's.
    import signal

    from safetensors import SafetensorError

    from jax_nvfp4 import cli as _cli
    from jax_nvfp4.checkpoint import inspect as _inspect

    for error, code, text in [(SafetensorError("No space left on device"), 2, "error: No space"),
                              (OSError(5, "Input/output error"), 2, "error: [Errno 5]"),
                              (_cli.Interrupted(signal.SIGTERM), 143, "interrupted (SIGTERM)"),
                              (KeyboardInterrupt(), 130, "interrupted (SIGINT)")]:
        def fail(args, error=error):
            raise error
        monkeypatch.setattr(_inspect, "run", fail)
        assert _cli.main(["inspect", "x"]) == code
        assert text in capsys.readouterr().err
    monkeypatch.setattr(_inspect, "run", lambda args: 1 / 0)  # a bug keeps its traceback
    try:
        _cli.main(["inspect", "x"])
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("a bug must not be turned into exit 2")
