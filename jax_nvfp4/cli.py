"""``python -m jax_nvfp4``: one sub-command per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from .errors import Interrupted, UserError  # noqa: F401  (Interrupted: raised by commands)

# name -> (module with configure(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "demo": ("jax_nvfp4.bench.demo",
             "prepare a synthetic DeepSeek-V3-shaped layer and check it"),
    "convert": ("jax_nvfp4.checkpoint.convert",
                "write a ModelOpt NVFP4 checkpoint as a prepared one"),
    "inspect": ("jax_nvfp4.checkpoint.inspect",
                "show what a checkpoint holds (naming, layers, sizes)"),
    "bench": ("jax_nvfp4.bench.layout",
              "time prepare_layer against the copy floor and torch baselines"),
    "bench-io": ("jax_nvfp4.bench.io",
                 "time load and convert against safetensors' own read"),
}


def _user_errors() -> tuple:
    """What is printed without a traceback (exit 2): safetensors' I/O errors are not OSError."""
    errors = (UserError, ValueError, TypeError, OSError)
    if "safetensors" in sys.modules:
        errors += (sys.modules["safetensors"].SafetensorError,)
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_nvfp4",
        description="NVFP4 MoE weights in the TensorRT-LLM / flashinfer layout, prepared in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        # Only the chosen command's module is imported (they pull in heavy deps).
        if name == chosen:
            importlib.import_module(module).configure(p)
    args = parser.parse_args(argv)
    run = importlib.import_module(COMMANDS[args.command][0]).run
    try:
        return run(args)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        if not isinstance(e, _user_errors()) or os.environ.get("JAX_NVFP4_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
