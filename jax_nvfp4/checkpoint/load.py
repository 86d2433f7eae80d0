"""load(path): a ModelOpt NVFP4 checkpoint to JAX params, layer by layer, at disk speed.

Each MoE layer is assembled on the host, one preallocated numpy buffer per stacked
array (float8 scales kept as bytes), filled straight from the shards with
``os.preadv`` by a small thread pool (adjacent pieces coalesced into one read), then
sent to the device in one transfer per array (per device when sharded; on CPU
without a copy). It is put into the kernel's layout either on the host while it is
assembled (each chunk of experts read into a small per-thread staging buffer, then
padded and permuted into the layer's buffer by numpy, which drops the GIL, while
other threads read: no XLA program at all) or by :func:`prepare_layer` on its
device, in place (a layer whose H or I the kernel pads is zero-padded on the host as it
is read, so it arrives in buffers of its final size: no second, larger buffer on the
device); :func:`layout_on_host` is the rule. No program runs per expert, so the
cost is linear in the bytes and flat in the number of experts. The host holds about
one layer's buffers at a time; the device holds the params loaded so far plus one
layer's scratch.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import math
import os
import queue
import sys
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .. import options as _options
from ..tree import marks as _marks
from .read import SCALE_NAMES, Checkpoint, CheckpointError, MoELayer, open_checkpoint
from ..numerics.scales import KERNEL_NAMES
from ..layer import prepare_layer
from ..layout import steps as _steps
from ..layout.spec import NAMES, SCALE_DTYPE
from ..tree.prepare import PreparedLayer

_DTYPES = (jnp.uint8, SCALE_DTYPE, jnp.uint8, SCALE_DTYPE)
THREADS = min(8, max(2, os.cpu_count() or 2))  # reads in flight (the kernel copies, no GIL)
TASK_BYTES = 16 << 20  # one read task: coalesced pieces up to this size (larger ones split)
_ALIGN = 4096
STAGE_BYTES = 4 << 20  # host layout: experts read and laid out per task (its staging)
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)
# safetensors dtype codes -> numpy (ml_dtypes for bfloat16 and float8)
_NUMPY_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16,
                 "I16": np.int16, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                 "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
                 "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64,
                 "I64": np.int64, "F64": np.float64}
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool():  # a forked child has the pool object but none of its threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _readers() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(THREADS, "jax_nvfp4-read")
        return _pool


def _put(x: np.ndarray, device):
    """One host->device transfer (a seam for tests, which count them)."""
    return jax.device_put(x, device)


class HostLayer(NamedTuple):
    """One MoE layer's stacked arrays on the host (uint8) and the bytes read.

    ``prepared``: the arrays are in the kernel's layout (padded shapes, laid out on the
    host, see :func:`layout_on_host`); else in the checkpoint's (stored shapes).
    """

    arrays: list
    nbytes: int
    prepared: bool = False


def _empty(shape) -> np.ndarray:
    """An uninitialised uint8 buffer aligned to a page: on CPU, ``device_put`` then takes
    it without a copy (XLA's CPU client wants 64-byte alignment for that)."""
    n = int(np.prod(shape))
    raw = np.empty(n + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + n].reshape(shape)


def _plan(ckpt: Checkpoint, layer: MoELayer, shapes, experts, first: int = 0) -> list[tuple]:
    """The reads of ``experts`` of the layer as runs (see :func:`_runs`), into buffers of
    the stored ``shapes`` whose expert 0 is expert ``first`` of the layer."""
    pieces = []
    for e in experts:
        for k, array in enumerate(NAMES):
            rows, row_bytes = shapes[k][1], math.prod(shapes[k][2:])
            for tensor, index, row in layer.parts(array, e):
                shard, offset, n = ckpt.span(tensor, index)
                dest = ((e - first) * rows + row) * row_bytes
                if n % row_bytes or row * row_bytes + n > rows * row_bytes:
                    raise CheckpointError(
                        f"{ckpt.file(tensor)}: tensor {tensor!r} ({n} bytes) does not fit rows "
                        f"{row}.. of expert {e} of {layer.prefix}.{array} {list(shapes[k])}")
                pieces.append((shard, offset, k, dest, n))
    return _runs(pieces)


def _runs(pieces) -> list[tuple]:
    """Pieces ``(shard, file offset, buffer k, offset in it, nbytes)`` as vectored reads.

    Returns ``[(shard, file offset, [(k, dest, n), ...])]``: each run is a contiguous
    range of one file (safetensors packs tensors back to back, so a shard's experts
    mostly follow each other) read by one ``preadv`` into its destinations, in order;
    destinations that follow each other in a buffer are merged.
    """
    order = {}
    pieces = sorted(pieces, key=lambda p: (order.setdefault(id(p[0]), len(order)), p[1]))
    runs = []
    for shard, offset, k, dest, n in pieces:
        if n == 0:  # an empty tensor: nothing to read (preadv would report 0 bytes)
            continue
        if runs and runs[-1][0] is shard and runs[-1][1] + runs[-1][3] == offset:
            run = runs[-1]
            if (last := run[2][-1])[0] == k and last[1] + last[2] == dest:
                run[2][-1] = (k, last[1], last[2] + n)
            else:
                run[2].append((k, dest, n))
            run[3] += n
        else:
            runs.append([shard, offset, [(k, dest, n)], n])
    return [(shard, offset, iov) for shard, offset, iov, _ in runs]


def _tasks(runs) -> list[list[tuple]]:
    """Runs grouped into read tasks of about ``TASK_BYTES`` (larger runs cut up)."""
    tasks, cur, size = [], [], 0
    for shard, offset, iov in runs:
        part, start = [], offset
        for k, dest, n in iov:
            done = 0
            while done < n:
                m = min(n - done, TASK_BYTES - size)
                part.append((k, dest + done, m))
                done += m
                size += m
                if size >= TASK_BYTES:
                    cur.append((shard, start, part))
                    tasks.append(cur)
                    start += sum(x[2] for x in part)
                    cur, part, size = [], [], 0
        if part:
            cur.append((shard, start, part))
    return tasks + ([cur] if cur else [])


def read_layer(ckpt: Checkpoint, layer: MoELayer, *, sharding=None,
               progress=None, prepare: bool = False, padded: bool = False) -> HostLayer:
    """Read one MoE layer into four preallocated host buffers (uint8).

    Stored shapes in the checkpoint's layout; with ``prepare``, padded shapes in the
    kernel's layout, each chunk of experts laid out on the host as it is read (see
    :func:`lay_out`; not for a prepared checkpoint's layer); with ``padded`` (for a layer
    :func:`prepare_layer` then prepares on its devices), the checkpoint's layout in the
    padded shapes, zero-padded as the kernel pads (:func:`pad_into`): on the device the
    layer is then prepared in place, with one chunk of scratch, where from the stored
    shapes it would need a new buffer per array (one at a time: about half the layer
    more). Only the experts that ``sharding`` places on this process's devices are read
    (the rest of the buffers is never touched). Reads run on a thread pool;
    ``progress(n)`` is called in the calling thread as each read task completes.
    """
    shapes = layer.spec.shapes(padded=False)
    experts = sorted({e for _, e0, e1 in _targets(sharding, shapes) for e in range(e0, e1)})
    if layer.prepared or not (prepare or (padded and layer.spec.needs_padding)):
        bufs = [_empty(s) for s in shapes]
        total = _read(_plan(ckpt, layer, shapes, experts), [b.reshape(-1) for b in bufs],
                      progress)
        return HostLayer(bufs, total, layer.prepared)
    bufs = [_empty(s) for s in layer.spec.shapes(padded=True)]
    per = max(1, min(len(experts), STAGE_BYTES // (layer.spec.nbytes // layer.spec.experts)))
    chunks = [(run[k], run[min(k + per, len(run)) - 1] + 1)
              for run in _consecutive(experts) for k in range(0, len(run), per)]
    stages = queue.SimpleQueue()  # staging buffers, one per task running at once
    total = _submit([functools.partial(_read_and_lay_out, ckpt, layer, bufs, e0, e1, per,
                                       stages, prepare) for e0, e1 in chunks], progress)
    return HostLayer(bufs, total, prepare)


def _consecutive(xs: list[int]) -> list[list[int]]:
    """Sorted ``xs`` cut into runs of consecutive ints."""
    runs: list[list[int]] = []
    for x in xs:
        if runs and runs[-1][-1] + 1 == x:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


def _read_and_lay_out(ckpt: Checkpoint, layer: MoELayer, bufs, e0: int, e1: int,
                      per: int, stages: queue.SimpleQueue, lay: bool = True) -> int:
    """Experts ``e0:e1`` (at most ``per``) read into a staging buffer taken from ``stages``
    (made if none is free, put back after) and laid out into ``bufs`` (``lay``), or only
    padded into them (:func:`pad_into`)."""
    spec = layer.spec
    padding = lay and spec.needs_padding  # lay_out pads into a staging buffer first
    try:
        stage = stages.get_nowait()
    except queue.Empty:  # four stored arrays, then (to lay out) four padded ones
        stage = [np.empty((per, *s[1:]), np.uint8) for s in spec.shapes(padded=False)] + [
            np.empty((per, *s[1:]), np.uint8) if padding else None
            for s in spec.shapes(padded=True)]
    try:
        total = _read_runs(_plan(ckpt, layer, spec.shapes(padded=False), range(e0, e1), e0),
                           [b.reshape(-1) for b in stage[:4]])
        for k in range(4):
            if lay:
                pad = stage[4 + k][:e1 - e0] if padding else None
                lay_out(stage[k][:e1 - e0], bufs[k][e0:e1], spec, k, padded=pad)
            else:
                pad_into(stage[k][:e1 - e0], bufs[k][e0:e1], spec, k)
    finally:
        stages.put(stage)
    return total


def pad_into(src: np.ndarray, dst: np.ndarray, spec, k: int) -> None:
    """Array ``k`` of ``NAMES`` for a block of experts, zero-padded as the kernel pads it
    (``layout.steps.pads``): ``src`` uint8 ``[n, R, C]`` (stored shape) into ``dst`` uint8
    ``[n, Rp, Cp]`` (padded shape), every byte of ``dst`` written. Gated w13 and its
    scales pad each half (up, gate) to ``Ip`` rows."""
    n = src.shape[0]
    if k < 2 and spec.gated:  # each half of w13 gets zero rows
        src = src.reshape(n * 2, src.shape[1] // 2, src.shape[2])
        dst = dst.reshape(n * 2, dst.shape[1] // 2, dst.shape[2])
    rows, cols = src.shape[1:]
    dst[:, :rows, :cols] = src
    dst[:, :rows, cols:] = 0
    dst[:, rows:] = 0


def lay_out(src: np.ndarray, dst: np.ndarray, spec, k: int, *, padded=None) -> None:
    """Array ``k`` of ``NAMES`` for a block of experts, from the checkpoint's layout into
    the kernel's, on the host: what :func:`prepare_layer` gives, byte for byte.

    ``src`` uint8 ``[n, R, C]`` (stored shape), ``dst`` uint8 ``[n, Rp, Cp]`` (padded
    shape, written). The same padding and ``_layout`` moves as ``prepare_layer``'s
    program (``layout.steps.pads``, ``layout.steps.moves``: scales' rows and swizzle fused),
    as numpy copies. ``padded`` (when ``spec`` needs padding): a ``[n, Rp, Cp]`` uint8
    buffer (any bytes) into which ``src`` is padded first.
    """
    n = src.shape[0]
    if spec.needs_padding:  # the stored bytes into the padded buffer, as steps.pads
        pad_into(src, padded, spec, k)
        src = padded
    (view, perm), = _steps.moves(spec, fuse=True)[k]
    # The last view axis is contiguous on both sides: moved as wider words (numpy's
    # strided copy costs per element; 4-byte scale groups as uint32 are ~3x faster).
    word = next(w for w in (8, 4, 2, 1) if view[-1] % w == 0)
    view = (*view[:-1], view[-1] // word)
    src, dst = src.view(f"u{word}"), dst.view(f"u{word}")
    dst.reshape(n, *(view[p] for p in perm))[...] = src.reshape(n, *view).transpose(
        0, *(p + 1 for p in perm))


def _read(runs, flat: list, progress) -> int:
    """Read ``runs`` (see :func:`_runs`) into the flat uint8 buffers ``flat``."""
    return _submit([functools.partial(_read_runs, t, flat) for t in _tasks(runs)], progress)


def _read_runs(task, flat: list) -> int:
    """Each ``(shard, offset, iov)`` of ``task`` read into ``flat``; the bytes read."""
    total = 0
    for shard, offset, iov in task:
        _preadv(shard, offset, [memoryview(flat[k][d:d + n]) for k, d, n in iov])
        total += sum(x[2] for x in iov)
    return total


def _submit(fns, progress) -> int:
    """Run ``fns`` (each returning the bytes it read) on the reader pool; their sum."""
    futures = [_readers().submit(fn) for fn in fns]
    total = 0
    try:
        for f in concurrent.futures.as_completed(futures):
            n = f.result()
            total += n
            if progress:
                progress(n)
    finally:
        for f in futures:  # on an error: no read left writing into the buffers
            f.cancel()
        concurrent.futures.wait(futures)
    return total


def _preadv(shard, offset: int, views: list) -> None:
    """Fill ``views`` in order from ``shard``'s bytes at ``offset``: vectored reads, no GIL."""
    fd, i = shard._descriptor(), 0
    while i < len(views):
        try:
            n = os.preadv(fd, views[i:i + _IOV_MAX], offset)
        except OSError as e:  # name the shard (preadv's error names no file)
            e.filename = str(shard.path)
            raise
        if n <= 0:
            raise CheckpointError(f"{shard.path}: cut short at byte {offset}; truncated?")
        offset += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def read_tensors(ckpt: Checkpoint, names, *, progress=None) -> dict[str, np.ndarray]:
    """Whole tensors ``names`` as :meth:`Checkpoint.read` gives them, read in parallel.

    Each lands in its own buffer (page-aligned from 1 MiB: zero-copy ``device_put`` on
    CPU); dtypes as safetensors stores them (bfloat16 and float8 via ml_dtypes).
    ``progress(n)`` is called in the calling thread as reads complete.
    """
    out, flat, pieces = {}, [], []
    for name in names:
        code, shape = ckpt.info(name)
        dtype = _NUMPY_DTYPES.get(code)
        if dtype is None or sys.byteorder != "little":  # stored little-endian
            out[name] = ckpt.read(name)
            if progress:
                progress(out[name].nbytes)
            continue
        shard, offset, n = ckpt.span(name)
        buf = _empty((n,)) if n >= 1 << 20 else np.empty(n, np.uint8)
        out[name] = buf.view(dtype).reshape(shape)
        pieces.append((shard, offset, len(flat), 0, n))
        flat.append(buf)
    _read(_runs(pieces), flat, progress)
    return out


def _in_place(arrays) -> bool:
    """Prepare in place (donated), except on CPU: there XLA's out-of-place program is ~3x
    faster and the extra layer it needs for a moment is host memory, like the buffers."""
    return any(d.platform != "cpu" for x in arrays for d in x.devices())


def layout_on_host(devices) -> bool:
    """Whether a loaded layer is put into the kernel's layout on the host, as it is read
    (:func:`read_layer` with ``prepare``), rather than by :func:`prepare_layer` on its
    devices after the transfer. ``devices``: where the layer goes; None for the host
    itself (``convert``, which writes it).

    On the host when it stays there (CPU devices, convert): no XLA program runs and the
    layout overlaps the reads. ``bench-io --layout both --repeats 3`` on a 2-core CPU,
    warm page cache, load host / device (x safetensors' read): Qwen3-30B-A3B shape with
    E=64, 2 layers (0.38 GB) 1.17x / 2.12x; Nemotron-3-Nano shape, padded (0.19 GB)
    2.17x / 11.6x; E=256 small experts 0.99x / 1.34x; 4 layers 1.39x / 1.92x; convert
    host / device (x read + write) 1.10x / 1.19x, 1.50x / 2.73x, 0.59x / 0.65x, 1.06x /
    1.13x. On an accelerator prepare_layer takes a few ms a layer after the transfer
    (H200, Qwen3-30B-A3B shape, 2 layers: load 0.17 s = 0.39x read) where the host
    would copy every byte once more: kept there until ``bench-io --layout both`` on
    the GPU machine says otherwise.
    """
    forced = _options.current().host_layout
    if forced is not None:
        return forced
    return devices is None or all(d.platform == "cpu" for d in devices)


def _devices(sharding) -> list:
    """The devices a layer loaded with ``sharding`` goes to (the default device for None)."""
    if sharding is not None:
        return list(sharding.addressable_devices)
    default = jax.config.jax_default_device
    if isinstance(default, str):
        return jax.devices(default)[:1]
    return [default] if default is not None else jax.devices()[:1]


def _to_device(host: list, shapes, targets, sharding) -> list:
    """The host buffers on device: one transfer per array (per device when sharded)."""
    host = [b.view(dt) for b, dt in zip(host, _DTYPES)]  # float8 is a view of the bytes
    if sharding is None:
        return [_put(h, targets[0][0]) for h in host]
    return [jax.make_array_from_single_device_arrays(
        s, sharding, [_put(h[e0:e1], device) for device, e0, e1 in targets])
        for h, s in zip(host, shapes)]


def _targets(sharding, shapes) -> list[tuple[object, int, int]]:
    """``[(device or None, first expert, end)]``: where each expert of the layer goes."""
    if sharding is None:
        return [(None, 0, shapes[0][0])]
    maps = [sharding.addressable_devices_indices_map(s) for s in shapes]
    out = []
    for device, index in maps[0].items():
        e0, e1, step = index[0].indices(shapes[0][0])
        for m, shape in zip(maps, shapes):
            ok = m[device][0].indices(shape[0]) == (e0, e1, step) and all(
                s.indices(n) == (0, n, 1) for s, n in zip(m[device][1:], shape[1:]))
            if step != 1 or not ok:
                raise ValueError(
                    f"sharding {sharding} must split only axis 0 (the experts) of the MoE "
                    f"arrays, e.g. NamedSharding(mesh, P('expert')); it gives {device} the "
                    f"block {m[device]} of shape {shape}")
        out.append((device, e0, e1))
    return out


def _replicated(sharding):
    """Where non-MoE tensors go: every device of ``sharding``, replicated (or the default)."""
    if sharding is None:
        return None
    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("devices",)),
                                      jax.sharding.PartitionSpec())


def load_layer(ckpt: Checkpoint, layer: MoELayer, *, prepare: bool, sharding=None,
               progress=None, host=None) -> dict:
    """One MoE layer of ``ckpt`` as a mapping of its twelve arrays, on device.

    The four weight arrays, the four checkpoint scalars and the four kernel scalars
    (:func:`kernel_scales`). ``prepare``: in the kernel's layout, laid out on the host
    as the layer is read or by :func:`prepare_layer` on the filled buffers (in place,
    except on CPU), as :func:`layout_on_host` says. A layer of a prepared checkpoint
    comes back as a :class:`PreparedLayer` with its arrays marked; prepared layers
    record the model's valid ``hidden_size`` and ``intermediate_size``.
    ``progress(nbytes)`` is called as the layer's bytes are read. ``host``: the layer
    already read by :func:`read_layer` (or a future of it), e.g. read ahead while the
    caller wrote the previous one (laid out or not). The scalars are read (and checked)
    first, so a broken scale fails before the layer's weights are read.
    """
    host_scales = ckpt.scales(layer)
    host_kernel = ckpt.kernel_scales(layer, host_scales)
    shapes = layer.spec.shapes(padded=False)
    targets = _targets(sharding, shapes)
    if host is None:
        on_host = layout_on_host(_devices(sharding))
        host = read_layer(ckpt, layer, sharding=sharding, progress=progress,
                          prepare=prepare and on_host, padded=prepare and not on_host)
    else:
        host = _taken(host, progress)
    if host.prepared and not (prepare or layer.prepared):
        raise ValueError(f"{layer.prefix}: read in the kernel's layout, asked unprepared")
    if not (prepare or layer.prepared) and [a.shape for a in host.arrays] != list(shapes):
        raise ValueError(f"{layer.prefix}: read padded, asked unprepared")
    laid_out = host.prepared
    arrays = _to_device(host.arrays, [a.shape for a in host.arrays], targets, sharding)
    del host
    sizes = {"hidden_size": layer.hidden, "intermediate_size": layer.intermediate}
    if laid_out:  # a prepared checkpoint's layer, or laid out on the host
        _marks.mark(*arrays)
        out = PreparedLayer(zip(NAMES, arrays), **sizes)
    elif prepare:
        out = PreparedLayer(zip(NAMES, prepare_layer(
            *arrays, gated=layer.gated, hidden_alignment=layer.spec.hidden_alignment,
            donate=_in_place(arrays))), **sizes)
    else:
        out = dict(zip(NAMES, arrays))
    out.update((n, jax.device_put(host_scales[n], sharding)) for n in SCALE_NAMES)
    # [E] along the experts like the other scalars; the [] global scale replicated
    out.update((n, jax.device_put(host_kernel[n], sharding if host_kernel[n].ndim
                                  else _replicated(sharding))) for n in KERNEL_NAMES)
    return out


def _taken(host, progress) -> HostLayer:
    """A layer read ahead by the caller (a HostLayer or a future of one), its bytes counted."""
    host = host.result() if isinstance(host, concurrent.futures.Future) else host
    if progress:
        progress(host.nbytes)
    return host


def host_layer(ckpt: Checkpoint, layer: MoELayer, *, progress=None, host=None) -> dict:
    """One MoE layer's twelve arrays prepared, as numpy on the host (what convert writes).

    Laid out on the host as it is read, or (where :func:`layout_on_host` says not for
    the host) by :func:`load_layer` on the default device and copied back. ``host``: as
    for :func:`load_layer`, read with or without ``prepare``.
    """
    if isinstance(host, concurrent.futures.Future):
        host = host.result()
    if host is None and layout_on_host(None):
        host = read_layer(ckpt, layer, progress=progress, prepare=True)
    elif host is None or not host.prepared:
        arrays = load_layer(ckpt, layer, prepare=True, progress=progress, host=host)
        for x in arrays.values():  # the device->host copies at once
            if x.devices().pop().platform != "cpu":  # (CPU: no copy)
                x.copy_to_host_async()
        return {n: np.asarray(x) for n, x in arrays.items()}
    elif progress:
        progress(host.nbytes)
    scales = ckpt.scales(layer)
    kernel = ckpt.kernel_scales(layer, scales)
    out = {n: b.view(dt) for n, b, dt in zip(NAMES, host.arrays, _DTYPES)}
    return {**out, **{n: scales[n] for n in SCALE_NAMES}, **{n: kernel[n] for n in KERNEL_NAMES}}


def _nest(flat: dict) -> dict:
    """``{"a.b.c": x}`` -> ``{"a": {"b": {"c": x}}}``; refuses names that clash."""
    root: dict = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")
        node = root
        for depth, key in enumerate(path):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"tensor {name!r} clashes with tensor "
                                 f"{'.'.join(path[:depth + 1])!r}")
        if leaf in node:
            raise ValueError(f"tensor {name!r} clashes with the tensors under it")
        node[leaf] = value
    return root


def load(path, *, prepare: bool = True, sharding=None, layers=None) -> dict:
    """Load a ModelOpt NVFP4 MoE checkpoint as JAX params, MoE layers prepared for the kernel.

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint directory: ``config.json`` / ``hf_quant_config.json`` saying
        ModelOpt NVFP4 and safetensors shards with ``model.safetensors.index.json``
        (or one ``model.safetensors``); or a checkpoint written by
        ``python -m jax_nvfp4 convert``. Expert naming (Qwen3-MoE/DeepSeek
        ``...mlp.experts.{e}.{gate,up,down}_proj``, Mixtral
        ``...block_sparse_moe.experts.{e}.{w1,w3,w2}``) is detected.
    prepare : bool, keyword-only
        Put each MoE layer into the layout of ``trtllm_fp4_block_scale_moe`` (the bytes
        of :func:`prepare_layer`) as it is loaded: on accelerators by
        :func:`prepare_layer` in place after the transfer; on CPU on the host while it is
        read (no XLA program; a few experts of staging per reader thread). With
        ``False`` the layers stay in the checkpoint layout, ready for :func:`prepare`. A prepared checkpoint
        must be loaded with ``False``; its layers come back marked as prepared.
    sharding : jax.sharding.Sharding, optional, keyword-only
        Sharding of the MoE arrays along their expert axis (axis 0), e.g.
        ``NamedSharding(mesh, P("expert"))``: each device receives only its own
        experts. Other tensors are replicated on the sharding's devices. Default:
        everything on the default device.
    layers : iterable of int, optional, keyword-only
        Decoder layers ``model.layers.{L}`` to load (default all); tensors outside
        the layers (embeddings, final norm, lm_head) are always loaded.

    Returns
    -------
    dict
        Nested dicts following the dotted tensor names, e.g.
        ``params["model"]["layers"]["3"]["mlp"]["experts"]``. Each experts mapping
        holds ``w13_weight`` (rows ``[up; gate]``), ``w13_weight_scale``,
        ``w2_weight``, ``w2_weight_scale`` (shapes and layout as in
        :func:`prepare_layer`), float32 ``w13_weight_scale_2`` and ``w13_input_scale``
        ``[E, 2]`` (columns gate, up) and ``w2_weight_scale_2``, ``w2_input_scale``
        ``[E]``, and the kernel's float32 scalars ``output1_scale_scalar``,
        ``output1_scale_gate_scalar``, ``output2_scale_scalar`` ``[E]`` and
        ``hidden_states_global_scale`` ``[]`` (see :func:`kernel_scales`: prepared or
        not, the same values). It is a :class:`PreparedLayer` when prepared, with the
        model's valid ``.hidden_size`` and ``.intermediate_size`` (the arrays are padded
        to the kernel's sizes). Other tensors are passed through unchanged as JAX arrays.

    Raises
    ------
    ValueError
        The checkpoint is invalid (the message names the file and tensor: missing
        or truncated shard, missing expert tensor, inconsistent shapes, not NVFP4,
        ``H % 16 != 0``); a prepared checkpoint with ``prepare=True``; a sharding
        that splits more than the expert axis. Everything is checked before
        anything is loaded, except the values of the per-expert scales (zero,
        negative, infinite or NaN: a broken checkpoint), checked as each layer's
        scalars are read, before its weights.
    """
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(f"sharding must be a jax.sharding.Sharding, got {type(sharding).__name__}")
    if not isinstance(prepare, bool):
        raise TypeError(f"prepare must be a bool, got {prepare!r}")
    if sharding is not None and len(sharding.device_set) > 1 \
            and not isinstance(sharding, jax.sharding.NamedSharding):
        raise TypeError(
            f"sharding must be a NamedSharding(mesh, PartitionSpec('expert')) to split the "
            f"experts over {len(sharding.device_set)} devices, got {type(sharding).__name__}")
    with open_checkpoint(path) as ckpt:
        if ckpt.prepared and prepare:
            raise ValueError(
                f"{path} is already prepared (converted by jax_nvfp4; see its "
                "jax_nvfp4.json): load it with prepare=False")
        groups = ckpt.groups(layers)
        for _, moe, _ in groups:
            for layer in moe:
                _targets(sharding, layer.spec.shapes(padded=False))
                ckpt.scales(layer)  # read and check every layer's scalars first (small)
        others = _replicated(sharding)
        flat = {}
        queue = [layer for _, moe, _ in groups for layer in moe]
        on_host = prepare and layout_on_host(_devices(sharding))
        on_device = prepare and not on_host  # prepared there, in place: padded on the host
        with ReadAhead() as ahead:
            for _, moe, names in groups:
                for name, x in read_tensors(ckpt, names).items():
                    flat[name] = jax.device_put(x, others)
                for layer in moe:
                    host = ahead.take(layer.prefix) or read_layer(
                        ckpt, layer, sharding=sharding, prepare=on_host, padded=on_device)
                    if (k := queue.index(layer) + 1) < len(queue):  # read while this one moves
                        ahead.start(queue[k].prefix, read_layer, ckpt, queue[k],
                                    sharding=sharding, prepare=on_host, padded=on_device)
                    flat[layer.prefix] = out = load_layer(ckpt, layer, prepare=prepare,
                                                          sharding=sharding, host=host)
                    del host
                    if isinstance(out, PreparedLayer):  # survives a save and restore
                        out[_marks.MARKER_KEY] = _marks.marker_array(_marks.marker_values(
                            gated=layer.gated, experts=layer.spec.experts,
                            hidden=layer.hidden, intermediate=layer.intermediate,
                            padded_h=2 * out["w13_weight"].shape[2],
                            padded_i=2 * out["w2_weight"].shape[2]), like=out["w13_weight"])
    return _nest(flat)


class ReadAhead:
    """Reads started on a background thread, taken later by key (at most what was started).

    The loader reads the next MoE layer while the current one goes to the device and is
    prepared; convert reads the next shard's tensors while it writes one. Reading has
    no effect on the output: an error in it is raised when its result is taken; on
    close (or leaving the ``with`` block) nothing is left running.
    """

    def __init__(self):
        self.pending, self.pool = {}, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self, key, fn, *args, **kwargs):
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(1, "jax_nvfp4-read-ahead")
        # in the caller's context: the options in force (``options.override``) apply there too
        self.pending[key] = self.pool.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    def take(self, key):
        """The future of what was started under ``key``, or None."""
        return self.pending.pop(key, None)

    def close(self):
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
