"""Tensor parallelism: a checkpoint's w13 laid out so that each rank's rows are its own layer."""

from __future__ import annotations

import jax
import numpy as np

from . import fuse as _fuse


def tp_interleave(w13_weight, w13_weight_scale, *, tp: int, donate: bool = False,
                  chunk_bytes: int | None = None):
    """Reorder a checkpoint's fused w13 (and its scales) for ``tp``-way tensor parallelism.

    A TP MoE kernel on rank ``j`` sees its own layer: rows ``j`` of each half, i.e.
    ``[up_j; gate_j]`` with ``up_j = up[j*I/tp:(j+1)*I/tp]`` (vLLM's slicing of the
    checkpoint). Split the checkpoint's ``[up; gate]`` rows evenly over ranks and rank 0
    would get half of ``up`` instead. This returns w13 with the rows
    ``[up_0; gate_0; up_1; gate_1; ...]``: sharded over ``tp`` devices along axis 1 (e.g.
    ``NamedSharding(mesh, P("expert", "tp"))``, w2 as ``P("expert", None, "tp")``), each
    device holds exactly its rank's layer, which is what :func:`prepare_layer` prepares
    there. The same as ``w13.reshape(E, 2, tp, I // tp, -1).swapaxes(1, 2).reshape(E, 2 * I,
    -1)``; the order of the halves is kept (``[gate; up]`` in gives ``[gate_j; up_j]`` per
    rank: prepare them with ``w13_order="gate_up"``). w2 needs no reordering.

    Parameters
    ----------
    w13_weight : uint8 ``[E, 2I, H/2]`` (numpy or jax)
    w13_weight_scale : float8_e4m3fn or uint8 ``[E, 2I, H/16]``
    tp : int, keyword-only
        The number of ranks splitting ``I`` (``I % tp == 0``; each rank's ``I / tp`` must be
        a multiple of 16 for :func:`prepare_layer`).
    donate : bool, keyword-only
        jax arrays: reorder in place in their buffers, chunk by chunk of experts (extra
        memory: one chunk), consuming the inputs. Else (and for numpy) a new array.
    chunk_bytes : int, optional, keyword-only
        Scratch per chunk when donating (default: 64 MiB).

    Returns
    -------
    ``(w13_weight, w13_weight_scale)``, numpy for numpy inputs, else jax arrays with the
    inputs' shardings. Apply it before ``I`` is split (on the host, or on arrays sharded
    along the experts only: those are reordered on each device without communication).
    """
    if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp <= 0:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    tp = int(tp)
    arrays = (w13_weight, w13_weight_scale)
    for name, x in zip(("w13_weight", "w13_weight_scale"), arrays):
        if not hasattr(x, "shape") or len(x.shape) != 3:
            raise ValueError(f"{name}: expected rank 3 [E, 2I, cols], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if isinstance(x, jax.Array) and x.is_deleted():
            raise ValueError(f"{name} has been deleted (donated to an earlier call)")
    if w13_weight.shape[:2] != w13_weight_scale.shape[:2]:
        raise ValueError(f"w13_weight_scale: expected {list(w13_weight.shape[:2])} on its first "
                         f"two axes (the rows of w13_weight), got {list(w13_weight_scale.shape)}")
    e, r1, _ = w13_weight.shape
    if r1 % (2 * tp):
        raise ValueError(f"w13_weight: {r1} rows = 2 x I with I = {r1 // 2}, which does not "
                         f"split into tp = {tp} equal parts")
    if tp == 1:
        return arrays
    if all(isinstance(x, np.ndarray) for x in arrays):
        return tuple(np.ascontiguousarray(_fuse._tp_fn(tp)(x)) for x in arrays)
    budget = 64 << 20 if chunk_bytes is None else int(chunk_bytes)
    if budget <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    chunks = []
    for x in arrays:
        per = int(np.prod(x.shape[1:])) * np.dtype(x.dtype).itemsize
        shards = getattr(x, "sharding", None)
        local_e = (shards.shard_shape(tuple(x.shape))[0] if shards is not None else e)
        chunks.append(max(1, min(local_e, budget // max(per, 1))))
    for x in arrays:
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        if spec is not None and len(spec) > 1 and spec[1] is not None:
            raise ValueError("tp_interleave: the rows (axis 1) are already split over devices "
                             f"({spec}); reorder before splitting I (on the host, or with the "
                             "experts split only)")
    return tuple(_fuse.move_rows(arrays, ("tp", tp), chunks=chunks, donate=donate))
