"""Which live arrays are already in the TRT-LLM layout, and copies of them.

jax.Array is unhashable and takes no attributes, so prepared arrays are
remembered by ``id`` with a weak reference that drops the entry when the
array dies (and guards against ``id`` reuse).

A copy (``jnp.array(out)``, ``jax.device_put`` to another device, a numpy round trip)
is a new object with the same bytes, so it is recognised by a fingerprint instead:
``SAMPLES`` bytes of each marked array at fixed pseudo-random offsets (a function of
its size only), with its shape and dtype (and, sharded, its first addressable shard's
index). The sample is gathered on the device when the array is marked, without waiting
for it; it is read back only when an input of the same shape, dtype and shard is
checked, which then costs one small gather of the input's bytes and a wait for them
(nothing for inputs of other shapes: e.g. raw layers of a padded model). Fingerprints
outlive their arrays (the last ``MAX_FINGERPRINTS`` are kept), so a copy is caught after
the original is gone.

What is not caught: copies whose sampled bytes are all equal (e.g. zeros: skipped, since
such arrays also look the same prepared or not), copies sharded differently from the
original (another first shard), and any array modified after the copy at the sampled
offsets. A false positive needs an unprepared array equal to a prepared one at every
sampled offset.
"""

from __future__ import annotations

import collections
import functools
import weakref

import numpy as np

from ..options import current

_PREPARED: dict[int, weakref.ref] = {}

SAMPLES = 64  # bytes per fingerprint
MAX_FINGERPRINTS = 4096
# Whether inputs are checked against the fingerprints: the option ``check_copies`` (True,
# False, or None for arrays on the CPU and numpy arrays only; see jax_nvfp4.options).
_OPTION = object()  # "check": the option in force
# key -> {sample bytes: None}, oldest first; pending: samples still on the device.
_FINGERPRINTS: collections.OrderedDict = collections.OrderedDict()
_PENDING: dict = {}
_COUNT = [0]


def _check(check):
    return current().check_copies if check is _OPTION else check


def mark(*arrays, check=_OPTION) -> None:
    """Remember ``arrays`` as prepared (and fingerprint them: see the module docstring;
    ``check``: ``check_copies``, default the option in force)."""
    for x in arrays:
        key = id(x)
        try:
            _PREPARED[key] = weakref.ref(x, lambda _, key=key: _PREPARED.pop(key, None))
        except TypeError:  # numpy or other non-weakrefable arrays cannot be marked
            pass
    try:
        _remember(arrays, _check(check))
    except Exception:  # noqa: BLE001 - fingerprints are best effort, never a failure
        pass


def is_marked(x) -> bool:
    """Whether ``x`` came out of ``prepare``/``prepare_layer`` (or a prepared checkpoint)."""
    ref = _PREPARED.get(id(x))
    return ref is not None and ref() is x


def _local(x, check):
    """``(key, data)``: the block of ``x`` that is sampled (its first addressable shard when
    sharded over several devices) and the fingerprint's key; None for other objects."""
    import jax

    if isinstance(x, jax.Array):
        if isinstance(x, jax.core.Tracer) or x.is_deleted():
            return None
        if check is None and not on_cpu(x.sharding):
            return None  # not fingerprinted on accelerators by default (see check_copies)
    shape, dtype = tuple(int(n) for n in x.shape), np.dtype(x.dtype)
    if dtype.itemsize != 1 or not shape or 0 in shape:
        return None
    if isinstance(x, jax.Array):
        if len(x.sharding.device_set) > 1:
            shard = x.addressable_shards[0]
            index = tuple((s.start, s.stop) for s in shard.index)
            return (shape, dtype.name, index), shard.data
        return (shape, dtype.name, None), x
    if isinstance(x, np.ndarray):
        return (shape, dtype.name, None), x
    return None


@functools.lru_cache(maxsize=256)
def on_cpu(sharding) -> bool:
    return all(d.platform == "cpu" for d in sharding.device_set)


@functools.lru_cache(maxsize=256)
def _offsets(n: int) -> np.ndarray:
    """``SAMPLES`` distinct offsets into ``n`` bytes, spread over the whole array."""
    k = min(SAMPLES, n)
    return np.sort(np.random.default_rng(n).choice(n, size=k, replace=False))


@functools.lru_cache(maxsize=64)
def _gather(shapes, dtypes):
    import jax
    import jax.numpy as jnp

    offsets = [jnp.asarray(_offsets(int(np.prod(s)))) for s in shapes]

    def f(*xs):
        return tuple((x if x.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(x, jnp.uint8))
                     .reshape(-1)[o] for x, o in zip(xs, offsets))

    return jax.jit(f)


def _samples(datas):
    """The sampled bytes of each block (device arrays, not waited for; numpy as is)."""
    out = [None] * len(datas)
    device = [k for k, d in enumerate(datas) if not isinstance(d, np.ndarray)]
    for k, d in enumerate(datas):
        if isinstance(d, np.ndarray):
            out[k] = np.ascontiguousarray(d).view(np.uint8).reshape(-1)[_offsets(d.size)]
    by_device: dict = {}
    for k in device:
        by_device.setdefault(frozenset(datas[k].devices()), []).append(k)
    for ks in by_device.values():
        got = _gather(tuple(tuple(datas[k].shape) for k in ks),
                      tuple(str(datas[k].dtype) for k in ks))(*(datas[k] for k in ks))
        for k, g in zip(ks, got):
            out[k] = g
    return out


def _remember(arrays, check) -> None:
    if check is False:  # no input is checked: fingerprints would only cost a gather
        return
    local = [_local(x, check) for x in arrays]
    local = [kd for kd in local if kd is not None]
    if not local:
        return
    for (key, _), sample in zip(local, _samples([d for _, d in local])):
        _PENDING.setdefault(key, []).append(sample)
        _COUNT[0] += 1
    if _COUNT[0] > MAX_FINGERPRINTS:  # keep the device samples bounded: read back the oldest
        for key in list(_PENDING):
            _settle(key)


def _settle(key) -> None:
    """Read back the pending samples of ``key`` into the fingerprints."""
    for sample in _PENDING.pop(key, ()):
        data = np.asarray(sample).tobytes()
        _COUNT[0] -= 1
        if len(set(data)) <= 1:
            continue  # constant bytes say nothing about the layout
        entry = _FINGERPRINTS.setdefault(key, {})
        entry[data] = None
        _FINGERPRINTS.move_to_end(key)
    while sum(len(v) for v in _FINGERPRINTS.values()) > MAX_FINGERPRINTS:
        _FINGERPRINTS.popitem(last=False)


def copies(arrays, check=_OPTION) -> list[bool]:
    """For each array, whether its bytes match a prepared array's fingerprint (a copy);
    ``check``: ``check_copies`` (default: the option in force; False: never a copy).

    Costs nothing for arrays whose shape, dtype and shard no prepared array had; else one
    gather of ``SAMPLES`` bytes per array and a wait for them. Marked arrays themselves
    are :func:`is_marked`; this is for the other objects.
    """
    out = [False] * len(arrays)
    check = _check(check)
    if check is False:
        return out
    try:
        local = [_local(x, check) for x in arrays]
        todo = [k for k, kd in enumerate(local)
                if kd is not None and (kd[0] in _PENDING or kd[0] in _FINGERPRINTS)]
        if not todo:
            return out
        for k in todo:
            _settle(local[k][0])
        todo = [k for k in todo if local[k][0] in _FINGERPRINTS]
        if not todo:
            return out
        for k, sample in zip(todo, _samples([local[k][1] for k in todo])):
            data = np.asarray(sample).tobytes()
            out[k] = len(set(data)) > 1 and data in _FINGERPRINTS[local[k][0]]
    except Exception:  # noqa: BLE001 - best effort: an unreadable input is checked elsewhere
        return [False] * len(arrays)
    return out


# --- The persistent mark: a small array saved with the layer ---------------------------
#
# The marks above live in this process only: a layer saved (Orbax, safetensors, pickle of
# numpy) and restored is new arrays with no mark, and its bytes look like any other. So
# ``prepare`` also writes a *marker leaf* into each layer it returns (under the key
# ``MARKER_KEY``, where the container can hold it): int32 ``[8]`` =
# ``[MAGIC, LAYOUT_VERSION, flags (bit 0: gated), E, H, I, Hp, Ip]`` with the layer's
# valid H and I and the prepared (padded) global sizes. It is saved and restored with the
# rest of the params, and ``prepare`` reads it.

MARKER_KEY = "nvfp4_layout"
MAGIC = 0x3446564E  # b"NVF4" little-endian
LAYOUT_VERSION = 1
_MARKER_LEN = 8


def marker_values(*, gated: bool, experts: int, hidden: int, intermediate: int,
                  padded_h: int, padded_i: int) -> np.ndarray:
    """The marker array (numpy int32 ``[8]``) of a prepared layer."""
    return np.array([MAGIC, LAYOUT_VERSION, int(bool(gated)), experts, hidden, intermediate,
                     padded_h, padded_i], np.int32)


def marker_array(values: np.ndarray, like):
    """``values`` as a jax array placed like ``like`` (replicated over its mesh when it is
    sharded with a NamedSharding, else on its device)."""
    return marker_arrays([values], [like])[0]


def marker_arrays(values: list, likes: list) -> list:
    """:func:`marker_array` of each ``(values, like)`` pair, in one ``device_put`` where
    each has a placement: a transfer a layer costs tens of microseconds of host time, a
    third of ``prepare(params)``'s time a layer over a loop of ``prepare_layer`` (CPU)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    places = []
    for like in likes:
        sharding = getattr(like, "sharding", None)
        if isinstance(sharding, NamedSharding):
            places.append(NamedSharding(sharding.mesh, PartitionSpec()))
        elif sharding is not None and len(sharding.device_set) == 1:
            places.append(next(iter(sharding.device_set)))
        else:
            places.append(None)  # JAX's default device
    out = [None] * len(values)
    placed = [k for k, place in enumerate(places) if place is not None]
    if placed:
        for k, x in zip(placed, jax.device_put([values[k] for k in placed],
                                               [places[k] for k in placed])):
            out[k] = x
    for k, place in enumerate(places):
        if place is None:
            out[k] = jax.device_put(values[k])
    return out


def read_marker(x, *, where: str = "") -> dict | None:
    """The fields of a marker leaf, or None when ``x`` is not one (any other value, e.g.
    a placeholder of zeros). A marker of an unknown layout version is a ``ValueError``."""
    import jax

    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array):
        if x.is_deleted() or tuple(x.shape) != (_MARKER_LEN,):
            return None
        x = x if x.is_fully_addressable else x.addressable_shards[0].data
    if not hasattr(x, "shape") or tuple(getattr(x, "shape", ())) != (_MARKER_LEN,):
        return None
    try:
        v = np.asarray(x)
    except Exception:  # noqa: BLE001 - not readable: not a marker
        return None
    if not np.issubdtype(v.dtype, np.integer) or int(v[0]) != MAGIC:
        return None
    if int(v[1]) != LAYOUT_VERSION:
        raise ValueError(f"{where}{MARKER_KEY}: a jax_nvfp4 layout marker of version "
                         f"{int(v[1])}; this jax_nvfp4 reads version {LAYOUT_VERSION}")
    names = ("gated", "experts", "hidden", "intermediate", "padded_h", "padded_i")
    out = dict(zip(names, (int(n) for n in v[2:])))
    out["gated"] = bool(out["gated"] & 1)
    return out
