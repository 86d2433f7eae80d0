"""JAX arrays <-> torch tensors through DLPack, and flashinfer's swizzle on JAX buffers.

Facts this builds on (``jax-torch-interop.md``): DLPack shares memory both
ways; ``torch.from_dlpack(x)`` makes torch's current stream wait for JAX's
producer; torch writing into a JAX buffer is covered by no protocol, so the
eager path synchronizes torch's stream before JAX may read; a live torch view
blocks donation, so views here never outlive the call; float4 cannot cross;
``jax.experimental.buffer_callback`` runs Python on XLA's own stream with
outputs aliased to donated inputs, which is the in-jit, in-place path.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

INSTALL_HINT = 'pip install "jax-nvfp4[flashinfer]" (torch and flashinfer-python>=0.7.2.post1)'
PREALLOCATION_HINT = (
    "JAX preallocates 75% of GPU memory at its first operation, leaving torch little. "
    "Set XLA_PYTHON_CLIENT_PREALLOCATE=false (allocate on demand) or "
    "XLA_PYTHON_CLIENT_MEM_FRACTION=.5 (a smaller share) in the environment before JAX "
    "starts, or use backend=\"xla\", which needs no torch memory"
)
_FLOAT4 = tuple(np.dtype(getattr(jnp, n)) for n in ("float4_e2m1fn",) if hasattr(jnp, n))
_BYTES = (np.dtype(np.uint8), np.dtype(jnp.float8_e4m3fn))

# The swizzle kernel: kernel(src [B, R, C] uint8 tensor, out=flat uint8 tensor).
# None means flashinfer's block_scale_interleave; tests put a torch stand-in here.
_kernel = None


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"torch_bridge needs torch: {INSTALL_HINT}") from e
    return torch


def _get_kernel():
    if _kernel is not None:
        return _kernel
    try:
        from flashinfer import block_scale_interleave
    except ImportError as e:
        raise ImportError(f"flashinfer is not installed: {INSTALL_HINT}") from e

    def kernel(src, *, out):
        if src.device.type != "cuda":
            raise ValueError(
                f"flashinfer's block_scale_interleave needs a CUDA device, got {src.device}; "
                'use jax_nvfp4\'s backend="xla" elsewhere'
            )
        return block_scale_interleave(src, out=out)

    return kernel


@contextlib.contextmanager
def _oom_hint():
    """torch running out of GPU memory next to JAX's pool, as an actionable error."""
    torch = _torch()
    try:
        yield
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            raise MemoryError(f"torch/flashinfer ran out of GPU memory ({e}). "
                              f"{PREALLOCATION_HINT}") from e
        raise


def _check_array(x, what: str) -> None:
    if not isinstance(x, jax.Array):
        raise TypeError(f"{what}: expected a jax.Array, got {type(x).__name__}")
    if x.is_deleted():
        raise ValueError(
            f"{what} has been deleted (donated to an earlier jit call or deleted): its "
            "memory may already hold something else. Use the array that call returned"
        )
    if np.dtype(x.dtype) in _FLOAT4:
        raise TypeError(
            f"{what}: float4_e2m1fn cannot cross DLPack (torch and JAX disagree on 4-bit "
            "types); pass the packed uint8 bytes (two e2m1 values a byte)"
        )
    if len(x.devices()) != 1:
        raise ValueError(f"{what}: expected an array on one device, got a sharded array on "
                         f"{len(x.devices())}; pass one shard (x.addressable_data(i))")


def to_torch(x):
    """A JAX array as a torch tensor on the same device, sharing its memory.

    float8 arrays come out as their ``uint8`` bytes (same shape): older torch
    rejects float8 over DLPack and flashinfer's kernels take uint8. Torch's
    current stream waits for the work that produces ``x`` (no host block).

    Keep the tensor short-lived: JAX refuses to donate ``x`` while it is alive.

    Raises
    ------
    TypeError
        Not a jax.Array, or float4.
    ValueError
        A deleted (donated) or sharded array.
    """
    torch = _torch()
    _check_array(x, "to_torch(x)")
    fp8 = np.dtype(x.dtype) == np.dtype(jnp.float8_e4m3fn)
    try:
        t = torch.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError) as e:
        if fp8:
            raise TypeError(f"this torch ({torch.__version__}) cannot import float8 through "
                            f"DLPack ({e}); upgrade torch or pass uint8 bytes") from e
        raise
    return t.view(torch.uint8) if fp8 else t


def from_torch(t, *, copy: bool = False):
    """A torch tensor as a JAX array on the same device, sharing its memory.

    JAX's stream waits for torch's pending work on ``t`` (DLPack stream handover).

    Parameters
    ----------
    t : torch.Tensor
        Contiguous (JAX imports only compact row-major strides).
    copy : bool, keyword-only
        Allow a copy where memory cannot be shared: a non-contiguous tensor, or
        on CPU a pointer JAX cannot use. With ``False`` (default) those raise.

    Raises
    ------
    TypeError
        Not a torch tensor.
    ValueError
        Not contiguous (or not shareable) and ``copy=False``.
    """
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"from_torch(t): expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        if not copy:
            raise ValueError(
                f"from_torch(t): tensor of shape {tuple(t.shape)} with strides {t.stride()} is "
                "not contiguous, so JAX cannot share its memory; pass copy=True to allow a "
                "copy, or call t.contiguous() yourself"
            )
        t = t.contiguous()
    try:
        return jax.dlpack.from_dlpack(t, copy=None if copy else False)
    except Exception as e:  # noqa: BLE001 - jaxlib raises several types here
        if copy:
            raise
        raise ValueError(f"from_torch(t): JAX cannot share this tensor's memory ({e}); pass "
                         "copy=True to allow a copy") from e


def _sizes(scales, what="scales"):
    if len(scales.shape) not in (2, 3):
        raise ValueError(f"{what}: expected [E, R, C] or [R, C], got shape {tuple(scales.shape)}")
    if np.dtype(scales.dtype) not in _BYTES:
        raise TypeError(f"{what}: expected uint8 or float8_e4m3fn scale bytes, got "
                        f"{np.dtype(scales.dtype).name}")
    b, r, c = (1, *scales.shape) if len(scales.shape) == 2 else scales.shape
    return b, r, c, -(-r // 128) * 128, -(-c // 4) * 4


def _check_out(out, b, rp, cp, start):
    if np.dtype(out.dtype) not in _BYTES:
        raise TypeError(f"out: expected uint8 or float8_e4m3fn, got {np.dtype(out.dtype).name}")
    per = rp * cp
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if out.size % per or out.size < (start + b) * per:
        raise ValueError(
            f"out: {out.size} bytes do not hold experts {start}..{start + b - 1} of "
            f"{rp}x{cp} padded bytes each (shape {tuple(out.shape)})"
        )


def block_scale_interleave(scales, *, out=None, start: int = 0):
    """flashinfer's ``block_scale_interleave`` (128x4 scale swizzle) on JAX arrays.

    Eager (outside ``jit``): the kernel reads ``scales`` and writes into ``out``
    through flashinfer's ``out=`` argument, zero-copy; torch allocates nothing.
    Torch's stream waits for JAX's producers and is synchronized before
    returning, so JAX reads the written bytes. Writing into a JAX array from
    outside XLA is outside JAX's model: use this for notebooks and debugging.

    Inside ``jit`` (``scales`` traced): the kernel runs through
    ``jax.experimental.buffer_callback`` on XLA's own stream, no host sync. With
    ``out`` the result is ``out`` with the experts written (aliased: in place
    when ``out`` is donated at the jit boundary); without, a new array.

    Parameters
    ----------
    scales : uint8 or float8_e4m3fn ``[E, R, C]`` (or ``[R, C]``)
        Linear (row-major) block scales, on a CUDA device.
    out : uint8 or float8_e4m3fn array, optional, keyword-only
        Destination holding whole experts of ``Rp * Cp`` bytes each (``Rp`` = ``R``
        rounded up to 128, ``Cp`` = ``C`` to 4), any shape. Experts ``start`` ..
        ``start + E - 1`` are written.
    start : int, keyword-only
        First expert of ``out`` written (0 without ``out``).

    Returns
    -------
    jax.Array
        Eager: ``out`` (a new flat uint8 ``[E * Rp * Cp]`` array when None).
        In jit: the updated ``out``, or a new ``[E, Rp, Cp]`` array of ``scales``' dtype.

    Raises
    ------
    TypeError, ValueError
        Wrong dtypes, shapes, deleted arrays, or a non-CUDA device.
    ImportError
        torch or flashinfer missing.
    MemoryError
        torch could not get GPU memory next to JAX's preallocated pool (with what to set).

    Notes
    -----
    The eager form with ``out`` writes into a live JAX array behind XLA's back: torch
    waits for the work that produced ``out``, but not for JAX work still *reading* it,
    and host copies JAX made of ``out`` earlier are not refreshed. Finish such work
    first (``jax.block_until_ready`` on its results), or use the jitted form, which
    runs on XLA's stream with ``out`` donated and has neither caveat.
    """
    b, r, c, rp, cp = _sizes(scales)
    if out is not None:
        _check_out(out, b, rp, cp, start)
    elif start != 0:
        raise ValueError(f"start={start} needs out= (a new output holds experts 0..{b - 1})")
    if isinstance(scales, jax.core.Tracer) or isinstance(out, jax.core.Tracer):
        return _in_jit(scales, out, start, (b, r, c, rp, cp))
    torch = _torch()
    _check_array(scales, "scales")
    if out is None:
        out = jnp.empty((b * rp * cp,), jnp.uint8, device=next(iter(scales.devices())))
    else:
        _check_array(out, "out")
        if out.devices() != scales.devices():
            raise ValueError(f"out is on {out.devices()}, scales on {scales.devices()}")
    kernel = _get_kernel()
    src = to_torch(scales).reshape(b, r, c)
    dst = to_torch(out).reshape(-1)[start * rp * cp:(start + b) * rp * cp]
    with _oom_hint():
        kernel(src, out=dst)
        if dst.device.type == "cuda":
            # JAX has no dependency on torch's stream: finish before JAX reads.
            torch.cuda.current_stream(dst.device).synchronize()
    del src, dst  # drop the external references (they block donation)
    return out


@contextlib.contextmanager
def on_xla_stream(ctx, buffer):
    """Inside a ``buffer_callback``: torch's current device and stream are XLA's (CUDA).

    Kernels launched in the block (torch's, flashinfer's, Triton's) then run in
    order with XLA's work on ``buffer``'s device, with no host synchronization.
    """
    torch = _torch()
    kind, index = buffer.__dlpack_device__()
    with _oom_hint(), contextlib.ExitStack() as stack:
        if kind == 2:  # kDLCUDA
            device = torch.device("cuda", index)
            stack.enter_context(torch.cuda.device(device))
            stack.enter_context(torch.cuda.stream(
                torch.cuda.ExternalStream(ctx.stream, device=device)))
        yield


def torch_bytes(buffer):
    """An XLA buffer of a ``buffer_callback`` as a torch uint8 tensor of the same shape
    (float8 bytes included), sharing its memory."""
    return _torch().from_dlpack(buffer).view(_torch().uint8)


def _in_jit(scales, out, start, sizes):
    from jax.experimental.buffer_callback import buffer_callback

    b, r, c, rp, cp = sizes
    lo, hi = start * rp * cp, (start + b) * rp * cp

    def callback(ctx, result, *args):
        kernel = _get_kernel()
        with on_xla_stream(ctx, result):
            dst = torch_bytes(result).reshape(-1)[lo:hi]
            src = torch_bytes(args[-1]).reshape(b, r, c)
            kernel(src, out=dst)

    if out is None:
        shape = jax.ShapeDtypeStruct((b, rp, cp), scales.dtype)
        return buffer_callback(callback, shape)(scales)
    shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
    return buffer_callback(callback, shape, input_output_aliases={0: 0})(out, scales)
