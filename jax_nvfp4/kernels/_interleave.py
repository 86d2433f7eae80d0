"""flashinfer's ``block_scale_interleave`` as an XLA FFI call (jax-tvm-ffi), no torch at run time.

flashinfer exports ``block_scale_interleave_sm100(input, output)`` (TVM-FFI,
``csrc/nv_internal/tensorrt_llm/thop/fp4Op.cpp``): ``input`` uint8 ``[E, R, C]``,
``output`` at least ``E * Rp * Cp`` bytes (``Rp`` = R rounded up to 128, ``Cp`` =
C to 4; only its data pointer is read), written on TVM-FFI's environment stream,
which jax-tvm-ffi sets to XLA's. It is registered as two FFI targets, both calling
the compiled function directly (no Python, no GIL at call time):

* ``FRESH`` (``["args", "rets"]``): ``f(scales, result)``, a new result buffer;
* ``INTO`` (``["args"]``): operands ``(scales, out)`` with ``out`` aliased to the
  result, so ``f(scales, out)`` writes into the result buffer itself: in place when
  ``out`` is donated at the jit boundary (XLA copies it first otherwise).

Torch is needed only to import flashinfer and JIT-compile its module (once, ~40 s on a
fresh machine); the calls run without it.
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from torch_bridge._bridge import _check_out, _sizes

from . import _ffi

FRESH = "jax_nvfp4.block_scale_interleave"
INTO = "jax_nvfp4.block_scale_interleave_into"

# Stand-ins for flashinfer's function per platform (tests: a numpy swizzle on "cpu").
# Each value is (function, register options); set before the first call on that platform.
_STAND_INS: dict[str, tuple[object, dict]] = {}
_lock = threading.Lock()


def _arch(cc: tuple[int, int]) -> str:
    major, minor = cc
    arch = f"{major * 10 + minor}"
    if arch in ("120", "121"):
        from flashinfer.jit import fp4_quantization as jit_fp4
        if hasattr(jit_fp4, "gen_fp4_quantization_sm120f_module"):
            return "120f"
    return arch


@functools.lru_cache(maxsize=None)
def _flashinfer_module(arch: str):
    """flashinfer's fp4 quantization module for ``arch`` (compiled on first use), as a
    TVM-FFI module: the same module ``flashinfer.block_scale_interleave`` calls."""
    try:
        from flashinfer.jit import fp4_quantization as jit_fp4
    except ImportError as e:
        raise ImportError(f"flashinfer is not installed: {_ffi.INSTALL_HINT}") from e
    gen = getattr(jit_fp4, f"gen_fp4_quantization_sm{arch}_module", None)
    if gen is None:
        raise ValueError(f"flashinfer {_flashinfer_version()} has no fp4 quantization module "
                         f"for sm_{arch}")
    return gen().build_and_load()


def _flashinfer_version() -> str:
    try:
        import flashinfer
        return flashinfer.__version__
    except Exception:  # noqa: BLE001
        return "(not importable)"


def ensure(platform: str, device=None) -> None:
    """Register the two targets for ``platform`` (loading flashinfer's module on "gpu").

    Raises
    ------
    ImportError
        jax-tvm-ffi, or on "gpu" flashinfer, missing (says what to install).
    ValueError
        A platform other than CUDA with no stand-in installed.
    """
    missing = _ffi.missing()
    if missing:
        raise ImportError(f"block_scale_interleave through XLA FFI: {missing}")
    if _ffi.is_registered(INTO, platform):
        return
    with _lock:
        if platform in _STAND_INS:
            function, options = _STAND_INS[platform]
        elif platform == "gpu":
            device = device if device is not None else jax.devices("gpu")[0]
            cc = _ffi.compute_capability(device) or (9, 0)
            function, options = _flashinfer_module(_arch(cc)).block_scale_interleave_sm100, {}
        else:
            raise ValueError(
                "block_scale_interleave through XLA FFI needs a CUDA GPU (flashinfer's kernel "
                f"is CUDA only); the arrays are on {platform}. Use jax_nvfp4's backend=\"xla\"")
        _ffi.register(FRESH, function, ["args", "rets"], platform, **options)
        _ffi.register(INTO, function, ["args"], platform, **options)


def _platforms(*arrays) -> set[str]:
    devices = _ffi.devices_of(*arrays) or {_ffi.default_device()}
    return {d.platform for d in devices}


def _u8(x):
    return x if np.dtype(x.dtype) == np.uint8 else lax.bitcast_convert_type(x, jnp.uint8)


def _as(x, dtype):
    return x if np.dtype(dtype) == np.uint8 else lax.bitcast_convert_type(x, dtype)


def block_scale_interleave(scales, *, out=None, start: int = 0):
    """flashinfer's 128x4 scale swizzle on JAX arrays through XLA FFI (jax-tvm-ffi).

    One FFI custom call on XLA's stream, eager or inside ``jit``: no torch, no host
    callback. Functional: returns the result; with ``out`` donated at the jit
    boundary (and ``start == 0``) the kernel writes straight into ``out``'s buffer.

    Parameters
    ----------
    scales : uint8 or float8_e4m3fn ``[E, R, C]`` (or ``[R, C]``)
        Linear (row-major) block scales, on a CUDA device.
    out : uint8 or float8_e4m3fn array, optional, keyword-only
        Destination holding whole experts of ``Rp * Cp`` bytes each (``Rp`` = ``R``
        rounded up to 128, ``Cp`` = ``C`` to 4), any shape. Experts ``start`` ..
        ``start + E - 1`` are written, the other bytes kept.
    start : int, keyword-only
        First expert of ``out`` written. ``0``: the kernel writes into ``out``'s buffer
        (aliased). Otherwise the result is computed into a new buffer and written into
        ``out`` by XLA (``dynamic_update_slice``, in place when donated): one extra
        pass over these experts' bytes.

    Returns
    -------
    jax.Array
        With ``out``: ``out`` with the experts written (same shape and dtype).
        Without: a new ``[E, Rp, Cp]`` array of ``scales``' dtype.

    Raises
    ------
    TypeError, ValueError
        Wrong dtypes or sizes, deleted arrays, arrays not on a CUDA device.
    ImportError
        jax-tvm-ffi or flashinfer missing.
    """
    b, r, c, rp, cp = _sizes(scales)
    if out is not None:
        _check_out(out, b, rp, cp, start)
    elif start != 0:
        raise ValueError(f"start={start} needs out= (a new output holds experts 0..{b - 1})")
    for x, what in ((scales, "scales"), (out, "out")):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted():
            raise ValueError(f"{what} has been deleted (donated to an earlier jit call or "
                             "deleted); use the array that call returned")
    for platform in _platforms(scales, out):
        ensure(platform, next(iter(_ffi.devices_of(scales, out)), None))
    per = rp * cp
    src = _u8(scales).reshape(b, r, c)
    if out is None:
        res = jax.ffi.ffi_call(FRESH, jax.ShapeDtypeStruct((b * per,), jnp.uint8))(src)
        return _as(res.reshape(b, rp, cp), scales.dtype)
    if start == 0:
        # out as it is, in its own shape and dtype (the kernel reads only its pointer): a
        # reshape or bitcast here makes XLA copy around the aliased buffer.
        return jax.ffi.ffi_call(INTO, jax.ShapeDtypeStruct(out.shape, out.dtype),
                                input_output_aliases={1: 0})(src, out)
    block = jax.ffi.ffi_call(FRESH, jax.ShapeDtypeStruct((b * per,), jnp.uint8))(src)
    flat = lax.dynamic_update_slice(out.reshape(-1), _as(block, out.dtype), (start * per,))
    return flat.reshape(out.shape)
