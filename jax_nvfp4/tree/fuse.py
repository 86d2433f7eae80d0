"""Gate and up: the order of w13's halves, and separate gate/up arrays fused into w13.

The kernel wants each expert's w13 rows as ``[up (w3); gate (w1)]`` (``w13_order=
"up_gate"``, what :func:`jax_nvfp4.load` produces). Hugging Face, vLLM and tpu-inference
fuse them as ``[gate; up]`` (``"gate_up"``). That order is put right *before* the layout
runs: each expert's two halves of w13 and of its scales are swapped by a jitted program,
chunk by chunk of experts, in the donated buffers (extra memory: one chunk, as the layout
itself), then the layout runs as for ``"up_gate"``. The cost is one more pass over w13 and
its scales (two thirds of a gated layer's bytes). Sharded layers are swapped per device
(under ``shard_map``): with ``I`` split, each device's rows are its own ``[gate; up]``.

Separate gate and up arrays (``[E, I, H/2]`` each, scales ``[E, I, H/16]``) are fused by
:func:`fuse_gate_up` into one new w13 ``[E, 2I, H/2]`` (``[up; gate]``) and its scales. XLA
cannot grow a buffer, so the fused array is one new buffer of the halves' size; while it is
written the halves are alive too (peak: twice the halves' bytes), and when donated they are
deleted right after. Nothing else of the layer is copied.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding

from ..layout.spec import SCALE_DTYPE

ORDERS = ("up_gate", "gate_up")
DEFAULT_ORDER = "up_gate"


def check_order(w13_order, gated) -> str:
    """``w13_order`` validated (``TypeError``/``ValueError``)."""
    if not isinstance(w13_order, str) or w13_order not in ORDERS:
        raise ValueError(f"w13_order must be one of {ORDERS} (the order of w13's two halves: "
                         f"'up_gate' = [up (w3); gate (w1)], as the kernel and load; "
                         f"'gate_up' = [gate (w1); up (w3)], as Hugging Face and vLLM fuse "
                         f"them), got {w13_order!r}")
    if w13_order != DEFAULT_ORDER and gated is False:
        raise ValueError(f"w13_order={w13_order!r} is for gated layers (w13 = [up; gate]); a "
                         "non-gated w13 holds only up")
    return w13_order


def chunked(x, fn, chunk: int):
    """``fn`` (shape-keeping) applied to ``x`` chunk by chunk of ``chunk`` experts along
    axis 0, each chunk written back into ``x``: in place under donation, one chunk of scratch
    (the pattern of ``transform._chunked``)."""
    def step(start, size, buf):
        block = lax.dynamic_slice_in_dim(buf, start, size, axis=0)
        return lax.dynamic_update_slice_in_dim(buf, fn(block), start, axis=0)

    n, tail = divmod(x.shape[0], chunk)
    if n:
        x = lax.fori_loop(0, n, lambda k, buf: step(k * chunk, chunk, buf), x)
    if tail:
        x = step(n * chunk, tail, x)
    return x


def swap_halves(block):
    """``[E, 2I, K]`` with each expert's two halves of rows exchanged."""
    i = block.shape[1] // 2
    return jnp.concatenate([block[:, i:], block[:, :i]], axis=1)


def _specs(arrays):
    shardings = [getattr(x, "sharding", None) for x in arrays]
    if all(isinstance(s, NamedSharding) for s in shardings):
        return tuple(shardings)
    return None


@functools.lru_cache(maxsize=64)
def _rows_program(fn_key, chunks, donate: bool, shardings):
    """Jitted program of arrays ``[E, R, K]``: ``fn`` on each, in place by chunks when
    donated (else out of place); per device under ``shard_map`` when ``shardings``."""
    fn = _FNS[fn_key[0]](*fn_key[1:])

    def program(*xs):
        outs = []
        for x, c in zip(xs, chunks):
            if outs:  # one array after the other: their chunks never need scratch at once
                x = lax.optimization_barrier((outs[-1], x))[1]
            outs.append(chunked(x, fn, c) if donate else fn(x))
        return tuple(outs)

    donated = tuple(range(len(chunks))) if donate else ()
    if shardings is None:
        return jax.jit(program, donate_argnums=donated)
    from .sharding import shard_map
    specs = tuple(s.spec for s in shardings)
    return jax.jit(shard_map(program, shardings[0].mesh, specs, specs), out_shardings=shardings,
                   donate_argnums=donated)


def _tp_fn(tp: int):
    def fn(block):
        c, r, k = block.shape
        return block.reshape(c, 2, tp, r // (2 * tp), k).swapaxes(1, 2).reshape(c, r, k)
    return fn


_FNS = {"swap": lambda: swap_halves, "tp": _tp_fn}


def move_rows(arrays, fn_key, *, chunks, donate: bool):
    """``arrays`` through :func:`_rows_program` (validated by the caller)."""
    return _rows_program(fn_key, tuple(chunks), donate, _specs(arrays))(*arrays)


def _delete(arrays):
    for x in arrays:
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()


def run_ordered(job, w13_order: str, runner):
    """Run a planned ``prepare_layer``/``unprepare_layer`` job (``transform.Job``) whose
    w13 is in ``w13_order``: ``runner`` (``transform.run_job``) does the layout.

    Prepare: w13 and its scales are swapped to ``[up; gate]`` first (in place when the job
    donates; else into temporary copies, deleted after). Unprepare: the checkpoint-layout
    result is swapped back to ``w13_order`` (in place: it is ours).
    """
    if w13_order == DEFAULT_ORDER:
        return runner(job)
    chunks = job.chunks[:2]
    if job.inverse:
        out = list(runner(job))
        if job.chunks is not None:
            chunks = _chunks_for(out[:2], job.chunks[:2])
        out[0], out[1] = move_rows(out[:2], ("swap",), chunks=chunks, donate=True)
        return tuple(out)
    w13, s13 = move_rows(job.arrays[:2], ("swap",), chunks=chunks, donate=job.donate)
    if job.donate:
        _delete(job.arrays[:2])
    swapped = dataclasses.replace(job, arrays=(w13, s13) + tuple(job.arrays[2:]))
    try:
        return runner(swapped)
    finally:
        if not job.donate:  # our temporary copies
            _delete((w13, s13))


def _chunks_for(arrays, chunks):
    """Experts per chunk for arrays whose rows changed (a crop): never more than E."""
    return tuple(min(int(c), int(x.shape[0])) for x, c in zip(arrays, chunks))


# --- separate gate and up -----------------------------------------------------------------

def check_halves(gate, gate_scale, up, up_scale, *, where: str = "", names=None):
    """Validate separate gate/up arrays; returns abstract stand-ins of the fused
    ``(w13_weight, w13_weight_scale)`` (for the layer's own validation)."""
    names = names or ("w1_weight", "w1_weight_scale", "w3_weight", "w3_weight_scale")
    arrays = (gate, gate_scale, up, up_scale)
    for name, x in zip(names, arrays):
        if isinstance(x, jax.core.Tracer):
            raise TypeError(f"prepare() got a tracer for {where}{name}: it cannot run inside "
                            "jax.jit; call it on concrete arrays")
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{where}{name}: expected an array, got {type(x).__name__}")
        if isinstance(x, jax.Array) and x.is_deleted():
            raise ValueError(f"{where}{name} has been deleted: it was donated to an earlier "
                             "call; use the arrays that call returned")
        if len(x.shape) != 3:
            raise ValueError(f"{where}{name}: expected rank 3 [experts, I, cols], got shape "
                             f"{tuple(x.shape)}")
    for k, (a, b) in enumerate(((gate, up), (gate_scale, up_scale))):
        na, nb = names[2 * 0 + k], names[2 + k]
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"{where}{nb}: expected the shape of {where}{na} "
                             f"{list(a.shape)} (gate and up are the two halves of w13), got "
                             f"{list(b.shape)}")
        if np.dtype(a.dtype) != np.dtype(b.dtype):
            raise TypeError(f"{where}{nb}: expected the dtype of {where}{na} "
                            f"({np.dtype(a.dtype).name}), got {np.dtype(b.dtype).name}")
        sa, sb = getattr(a, "sharding", None), getattr(b, "sharding", None)
        if (isinstance(sa, NamedSharding) or isinstance(sb, NamedSharding)) and sa != sb:
            raise ValueError(f"{where}{nb}: expected the sharding of {where}{na} ({sa}), got "
                             f"{sb}; gate and up are fused on each device")
    e, i, k = gate.shape
    stand_ins = []
    for a in (gate, gate_scale):
        sharding = getattr(a, "sharding", None)
        sharding = sharding if isinstance(sharding, NamedSharding) else None
        stand_ins.append(jax.ShapeDtypeStruct((a.shape[0], 2 * a.shape[1], a.shape[2]),
                                              a.dtype, sharding=sharding))
    return tuple(stand_ins)


@functools.lru_cache(maxsize=64)
def _fuse_program(shardings):
    def program(gate, gate_scale, up, up_scale):
        return (jnp.concatenate([up, gate], axis=1),
                jnp.concatenate([up_scale, gate_scale], axis=1))

    if shardings is None:
        return jax.jit(program)
    from .sharding import shard_map
    specs = tuple(s.spec for s in shardings)
    return jax.jit(shard_map(program, shardings[0].mesh, specs, specs[:2]),
                   out_shardings=shardings[:2])


def fuse_gate_up(gate, gate_scale, up, up_scale, *, donate: bool = True):
    """Fuse separate gate (w1) and up (w3) projections into one w13 ``[up; gate]``.

    Parameters
    ----------
    gate, up : uint8 ``[E, I, H/2]``
        Packed e2m1 of the gate (w1, ``gate_proj``) and up (w3, ``up_proj``) projections.
    gate_scale, up_scale : float8_e4m3fn or uint8 ``[E, I, H/16]``
        Their linear block scales (the same dtype for both).
    donate : bool, keyword-only
        Delete the four inputs once the fused arrays are written.

    Returns
    -------
    tuple of jax.Array
        ``(w13_weight [E, 2I, H/2], w13_weight_scale [E, 2I, H/16])``, each expert's rows
        ``[up; gate]`` (``w13_order="up_gate"``, the kernel's and :func:`load`'s order), in
        the checkpoint layout: pass them to :func:`prepare_layer`.

    Memory: XLA cannot grow a buffer, so each fused array is one new buffer (the halves'
    bytes); while it is written the halves are alive too (peak: twice the halves' bytes),
    and with ``donate=True`` they are deleted right after. Arrays sharded with a
    ``NamedSharding`` are fused on each device (no communication): with ``I`` split over
    devices, each device's w13 rows are its own ``[up; gate]``, as the sharded
    :func:`prepare_layer` wants.
    """
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    check_halves(gate, gate_scale, up, up_scale,
                 names=("gate", "gate_scale", "up", "up_scale"))
    arrays = (gate, gate_scale, up, up_scale)
    for name, x, want in zip(("gate", "up"), (gate, up), (np.uint8, np.uint8)):
        if np.dtype(x.dtype) != np.dtype(want):
            raise TypeError(f"{name}: expected uint8 (two packed e2m1 values a byte), got "
                            f"{np.dtype(x.dtype).name}")
    if np.dtype(gate_scale.dtype) not in (np.dtype(SCALE_DTYPE), np.dtype(np.uint8)):
        raise TypeError(f"gate_scale: expected float8_e4m3fn (or its uint8 bytes), got "
                        f"{np.dtype(gate_scale.dtype).name}")
    if gate.shape[:2] != gate_scale.shape[:2] or gate.shape[2] != 8 * gate_scale.shape[2]:
        raise ValueError(f"gate_scale: expected shape {[*gate.shape[:2], gate.shape[2] // 8]} "
                         f"(one scale per 16 values of gate {list(gate.shape)}), got "
                         f"{list(gate_scale.shape)}")
    return _fuse(arrays, donate=donate)


def _fuse(arrays, *, donate: bool):
    """The fused ``(w13, w13_scale)`` of validated ``(gate, gate_scale, up, up_scale)``."""
    out = _fuse_program(_specs(arrays))(*arrays)
    if donate:
        _delete(arrays)
    return out
