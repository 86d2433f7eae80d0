"""XLA FFI targets from TVM-FFI functions (jax-tvm-ffi): registration, devices, refusals.

flashinfer's kernels are TVM-FFI functions. ``jax_tvm_ffi.register_ffi_target``
wraps one as an XLA FFI handler: XLA calls it on its own stream (set as TVM-FFI's
environment stream, which flashinfer's ``get_stream`` reads), with XLA's buffers as
DLPack tensors. No torch and no Python run at call time when the function is a
compiled one; a Python adaptor (argument reordering) runs under the GIL.
"""

from __future__ import annotations

import importlib.util
import threading

import jax

INSTALL_HINT = ('pip install "jax-nvfp4[flashinfer]" (torch, flashinfer-python and '
                "jax-tvm-ffi>=0.1.3)")

_lock = threading.Lock()
_registered: dict[tuple[str, str], object] = {}


def missing() -> str | None:
    """Why jax-tvm-ffi cannot be used here (None when it can)."""
    for module, what in (("jax_tvm_ffi", "jax-tvm-ffi"), ("tvm_ffi", "apache-tvm-ffi")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed; {INSTALL_HINT}"
    try:
        import jax_tvm_ffi  # noqa: F401  (loads its shared library)
    except Exception as e:  # noqa: BLE001 - a broken install raises various types
        return f"jax-tvm-ffi does not load ({type(e).__name__}: {e}); {INSTALL_HINT}"
    return None


def register(name: str, function, arg_spec, platform: str, **options) -> None:
    """Register ``function`` as XLA FFI target ``name`` on ``platform`` once per process.

    A second call with the same ``(name, platform)`` does nothing: XLA keeps the
    first handler for a name, so a target is bound to one function for the
    process's life.
    """
    with _lock:
        if (name, platform) in _registered:
            return
        import jax_tvm_ffi

        _registered[(name, platform)] = jax_tvm_ffi.register_ffi_target(
            name, function, list(arg_spec), platform=platform, **options)


def is_registered(name: str, platform: str) -> bool:
    return (name, platform) in _registered


def compute_capability(device) -> tuple[int, int] | None:
    """A CUDA device's compute capability ``(major, minor)``, from JAX (no torch); None
    for other devices."""
    if getattr(device, "platform", None) != "gpu":
        return None
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def devices_of(*arrays):
    """The devices holding ``arrays`` (jax.Arrays only; tracers contribute none)."""
    out = set()
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            out |= set(x.devices())
    return out


def default_device():
    """The device a computation traced without concrete arrays will run on (JAX's default)."""
    d = jax.config.jax_default_device
    if d is None:
        return jax.devices()[0]
    return jax.devices(d)[0] if isinstance(d, str) else d
