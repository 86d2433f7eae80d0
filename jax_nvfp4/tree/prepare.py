"""prepare(params): every MoE layer of a model's params pytree (found by ``_find``; gate/up
order and fusion by ``_fuse``; the marker leaf by ``_marks``)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from . import find as _find, fuse as _fuse, marks as _marks, sharding as _sharding
from ..backends.select import resolve_backend
from .fuse import fuse_gate_up  # noqa: F401  (public: jax_nvfp4.fuse_gate_up)
from .marks import MARKER_KEY
from ..transform import experts_per_chunk, plan_job, run_job
from ..layout.spec import DEFAULT_HIDDEN_ALIGNMENT, NAMES, check_arrays


def _size(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise TypeError(f"PreparedLayer: {name} must be a positive int or None, got {value!r}")
    return int(value)


class PreparedLayer(dict):
    """A MoE layer mapping whose four arrays are in the TRT-LLM layout.

    A plain ``dict`` in every way (serving code reads the same keys) and a
    pytree node like ``dict``; its type is the mark that makes :func:`prepare`
    refuse to shuffle the layer twice, and it survives ``jax.tree.map``,
    ``jax.device_put`` and the like. The type does not survive a save and restore
    (Orbax restores plain dicts): for that, :func:`prepare` also puts the marker leaf
    ``"nvfp4_layout"`` into the layers it returns (int32 ``[8]``: ``[0x3446564E ("NVF4"),
    layout version 1, flags (bit 0: gated), E, H, I, Hp, Ip]``, valid and prepared sizes),
    which ``prepare`` reads back (``skip_prepared=True`` rebuilds the ``PreparedLayer``).

    Parameters
    ----------
    mapping_or_items : mapping or iterable of (key, value), optional
        The entries, as for ``dict``.
    hidden_size, intermediate_size : int or None, keyword-only
        The model's valid ``H`` and ``I`` before any padding (the prepared arrays
        may be larger: see :func:`prepare_layer`); None when unknown. Read them as
        the attributes ``.hidden_size`` and ``.intermediate_size``; they are pytree
        aux data, so they survive ``jax.tree.map`` and flatten/unflatten. Built from
        another ``PreparedLayer``, the sizes not given are taken from it.
    """

    def __init__(self, mapping_or_items=(), /, *, hidden_size: int | None = None,
                 intermediate_size: int | None = None):
        super().__init__(mapping_or_items)
        if isinstance(mapping_or_items, PreparedLayer):
            hidden_size = mapping_or_items.hidden_size if hidden_size is None else hidden_size
            if intermediate_size is None:
                intermediate_size = mapping_or_items.intermediate_size
        self._hidden_size = _size("hidden_size", hidden_size)
        self._intermediate_size = _size("intermediate_size", intermediate_size)

    @property
    def hidden_size(self) -> int | None:
        """The model's valid hidden size ``H`` before padding (None: unknown)."""
        return self._hidden_size

    @property
    def intermediate_size(self) -> int | None:
        """The model's valid intermediate size ``I`` before padding (None: unknown)."""
        return self._intermediate_size

    def copy(self) -> PreparedLayer:
        return PreparedLayer(self)

    def __reduce__(self):  # pickle/copy keep the sizes
        return (_rebuild, (dict(self), self._hidden_size, self._intermediate_size))

    def __repr__(self) -> str:
        return (f"PreparedLayer({dict.__repr__(self)}, hidden_size={self._hidden_size}, "
                f"intermediate_size={self._intermediate_size})")


def _rebuild(items, hidden_size, intermediate_size):
    return PreparedLayer(items, hidden_size=hidden_size, intermediate_size=intermediate_size)


def _flatten(layer):
    keys = sorted(layer)
    aux = (tuple(keys), layer.hidden_size, layer.intermediate_size)
    return [(jax.tree_util.DictKey(k), layer[k]) for k in keys], aux


def _unflatten(aux, children):
    keys, hidden_size, intermediate_size = aux
    return PreparedLayer(zip(keys, children), hidden_size=hidden_size,
                         intermediate_size=intermediate_size)


jax.tree_util.register_pytree_with_keys(PreparedLayer, _flatten, _unflatten)


def _is_layer(x) -> bool:
    return isinstance(x, Mapping) and all(n in x for n in NAMES)


def _marker_of(node, km, where=""):
    """The marker fields of a layer node (None: no marker leaf, or not a marker)."""
    index = node.names.get(km[MARKER_KEY])
    if index is None:
        return None
    return _marks.read_marker(_find.unwrap(node.children[index])[0], where=where)


def is_prepared(layer, *, keys=None) -> bool:
    """Whether a layer (any container :func:`prepare` finds, or one array) is already in the
    TRT-LLM layout: a :class:`PreparedLayer`, arrays that came out of ``prepare`` in this
    process, or a layer holding a valid ``nvfp4_layout`` marker (saved and restored with
    it). ``keys``: the key map, as for :func:`prepare`."""
    if isinstance(layer, PreparedLayer):
        return True
    km = _find.key_map(keys)
    node = _find.children(layer)
    if node is not None and _find.classify(node, km):
        arrays = [_find.unwrap(node.children[i])[0] for n, i in node.names.items()
                  if n in {km[c] for c in NAMES + _find.SEPARATE}]
        return any(_marks.is_marked(x) for x in arrays) or _marker_of(node, km) is not None
    return _marks.is_marked(_find.unwrap(layer)[0])


class PrepareError(RuntimeError):
    """A layer of :func:`prepare` failed while running (after validation), e.g. out of memory.

    Attributes
    ----------
    params
        The tree as far as it got: the layers before the failing one prepared (each a
        :class:`PreparedLayer`, as ``prepare`` would have returned them), the failing layer
        and every later one as they were passed in. With donation, the earlier layers'
        inputs are consumed, so this is the only place their results live.
    path : str
        The failing layer's path in the tree, e.g. ``"['layers'][3]['mlp']"``.
    prepared, remaining : list of str
        Paths of the layers prepared, and of those not (the failing one first).

    The original exception is ``__cause__``. Later layers are untouched. The failing
    layer's arrays are as the failure left them: alive when it came before XLA consumed
    the donated buffers (compile or allocation failures are raised before), else check
    ``is_deleted()``. Resume with ``prepare(err.params, skip_prepared=True)``.
    """

    def __init__(self, message, *, params, path, prepared, remaining):
        super().__init__(message)
        self.params, self.path = params, path
        self.prepared, self.remaining = list(prepared), list(remaining)


def prepare(params, *, gated: bool = True, donate: bool = True, backend: str = "auto",
            chunk_bytes: int | None = None, hidden_alignment: int = DEFAULT_HIDDEN_ALIGNMENT,
            skip_prepared: bool = False, keys=None, w13_order: str = "up_gate"):
    """Prepare every NVFP4 MoE layer of a params pytree for the TRT-LLM kernel.

    A layer is any pytree node (a dict, a flax ``nnx.State``, a dataclass registered with
    ``jax.tree_util.register_dataclass``, a NamedTuple, a node registered with
    ``register_pytree_with_keys``, an unregistered ``Mapping``) whose children are named
    (by their pytree keys) ``w13_weight``, ``w13_weight_scale``, ``w2_weight`` and
    ``w2_weight_scale`` (see :func:`prepare_layer` for shapes and dtypes), or, with gate and
    up separate, ``w1_weight``, ``w1_weight_scale`` (gate), ``w3_weight``,
    ``w3_weight_scale`` (up) and the two w2 names. A child may be an array or a wrapper
    holding one array (``nnx.Param``): the prepared array goes back into a wrapper of the
    same kind and metadata. Every other leaf is returned as the same object and the tree
    keeps its structure, except as said below.

    How a layer comes back:

    * a ``dict``: as a :class:`PreparedLayer` (a ``dict``; the type is the mark, with
      ``.hidden_size`` and ``.intermediate_size`` the layer's valid ``H`` and ``I``), its
      other entries unchanged, plus the marker leaf ``"nvfp4_layout"`` (int32 ``[8]``) that
      survives a save and restore (Orbax, ``device_get``/``device_put``): ``prepare`` reads
      it and refuses the layer; ``prepare(..., skip_prepared=True)`` returns such a layer as
      a :class:`PreparedLayer` again, sizes and all. Separate gate and up are fused into
      ``w13_weight``/``w13_weight_scale`` (``[up; gate]``; see :func:`fuse_gate_up` for the
      memory) and their keys dropped.
    * any other container: the same type with the prepared arrays in place (so
      ``nnx.merge`` takes the state back). It gets the marker only if it has a child named
      ``nvfp4_layout`` (e.g. a dataclass field or an ``nnx.Variable`` declared for it; any
      placeholder value): prepare fills it. Without it, its arrays carry the mark in this
      process only. Separate gate and up cannot become one field there: refused (fuse them
      in the model with :func:`fuse_gate_up`).

    Parameters
    ----------
    keys : mapping, optional, keyword-only
        The model's names for the canonical ones, e.g. ``{"w13_weight": "gate_up_proj",
        "w13_weight_scale": "gate_up_proj_scale", "w2_weight": "down_proj", ...}``; names not
        given stay canonical. Canonical names: the eight above and ``"nvfp4_layout"``.
        Prepared arrays come back under the model's names (fused gate/up: under the name
        mapped for ``w13_weight``/``w13_weight_scale``).
    w13_order : {"up_gate", "gate_up"}, keyword-only
        The order of each expert's two halves of a fused w13 (and its scales) as passed:
        ``"up_gate"`` = ``[up (w3); gate (w1)]`` (default: what :func:`load` produces and
        the kernel wants), ``"gate_up"`` = ``[gate; up]`` (Hugging Face, vLLM and
        tpu-inference fuse them so). ``"gate_up"`` costs one more in-place pass over w13
        and its scales (see :func:`prepare_layer`). Separate gate/up arrays have no order.
    skip_prepared : bool, keyword-only
        Return layers already prepared as they are instead of refusing them (to resume
        after a :class:`PrepareError`, or to recover restored layers by their marker).

    Other options are those of :func:`prepare_layer` and apply to every layer. All layers
    are validated before any buffer is donated. Layers run one after the other. If one fails
    while running (out of memory, say), nothing is lost: :class:`PrepareError` carries the
    tree with every earlier layer prepared (``err.params``) and the failing and later
    layers as passed in; resume with ``prepare(err.params, skip_prepared=True)``.

    Raises
    ------
    ValueError
        No MoE layer in ``params`` (naming nodes that look like expert containers); a node
        that looks like a broken layer (all but one of the names, or a misspelt one: the
        close name is suggested), naming its path; a layer already prepared (a
        :class:`PreparedLayer`, arrays that came out of ``prepare``, or its marker); an array
        shared between layers while donating; a bad ``keys`` map or ``w13_order``; or any
        :func:`prepare_layer` refusal, naming the layer's path. Nothing is donated when this
        is raised.
    TypeError
        A wrong dtype, naming the layer's path; tracers (``prepare`` cannot run under
        ``jax.jit``).
    PrepareError
        A layer failed while running, after validation (see above).
    """
    if not isinstance(skip_prepared, bool):
        raise TypeError(f"skip_prepared must be a bool, got {skip_prepared!r}")
    km = _find.key_map(keys)
    _fuse.check_order(w13_order, gated)
    found: dict = {}

    def is_leaf(x):
        node = _find.children(x)
        if node is None:
            return False
        kind = _find.classify(node, km)
        why = None if kind else _find.near_miss(node, km)
        if kind or why:
            found[id(x)] = (node, kind, why)  # x lives in params: its id is stable here
            return True
        return False

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
    layers, misses = [], []
    for i, (p, x) in enumerate(flat):
        if id(x) not in found:
            continue
        node, kind, why = found[id(x)]
        path = jax.tree_util.keystr(p)
        if why:
            misses.append(f"params{path} {why}")
        elif kind == "both":
            raise ValueError(f"params{path} holds both a fused w13 ({km['w13_weight']!r}) and "
                             f"separate gate/up ({km['w1_weight']!r}, {km['w3_weight']!r}); "
                             "keep one of them")
        else:
            layers.append((i, path, node, kind))
    if misses:
        raise ValueError("prepare: a node looks like a MoE layer with a missing or misspelt "
                         "key (nothing was changed or donated): " + "; ".join(misses))
    if not layers:
        hint = _find.candidates(jax.tree_util.tree_flatten_with_path(params)[0])
        raise ValueError(
            f"no MoE layer found: no node of params holds all of the keys {NAMES} (or, gate "
            f"and up separate, {_find.SEPARATE + NAMES[2:]})"
            + (f"; nodes holding rank-3 byte arrays: {', '.join(hint)}: if they are MoE "
               "layers under other names, pass keys={canonical name: the model's name}"
               if hint else "; if the model names them otherwise, pass keys={canonical "
               "name: the model's name}"))
    seen: dict[int, str] = {}
    jobs = []
    recovered = []
    for i, path, node, kind in layers:
        where = f"params{path}."
        canon = NAMES if kind == "fused" else _find.SEPARATE + NAMES[2:]
        vals = {c: _find.unwrap(node.children[node.names[km[c]]]) for c in canon}
        arrays = {c: v[0] for c, v in vals.items()}
        marker = _marker_of(node, km, where)
        if marker is not None and kind == "fused":
            _check_marker(marker, arrays, where + km[MARKER_KEY])
        if (isinstance(node.obj, PreparedLayer) or marker is not None
                or any(_marks.is_marked(a) for a in arrays.values())):
            if skip_prepared:
                if marker is not None and not isinstance(node.obj, PreparedLayer):
                    recovered.append((i, node, marker, vals))
                continue
            said = (f" (its {km[MARKER_KEY]!r} marker says so: prepared by jax_nvfp4, "
                    f"H={marker['hidden']}, I={marker['intermediate']})" if marker else "")
            raise ValueError(
                f"params{path} is already in the TRT-LLM layout{said}; prepare() refuses to "
                "shuffle it twice (nothing was changed or donated)"
            )
        options = dict(gated=gated, donate=donate, backend=backend, chunk_bytes=chunk_bytes,
                       inverse=False, where=where, hidden_alignment=hidden_alignment,
                       caller="prepare")
        if kind == "fused":
            job = plan_job((arrays[n] for n in NAMES), **options)
            donated = list(zip(NAMES, job.arrays))
        else:
            _check_separate(node, path, vals, km, options)
            job = None
            donated = list(arrays.items())
        for n, x in donated:
            if donate and id(x) in seen:
                raise ValueError(
                    f"params{path}.{km[n]} is the same array as {seen[id(x)]}; it cannot be "
                    "donated twice (pass donate=False)"
                )
            seen[id(x)] = f"params{path}.{km[n]}"
        jobs.append((i, path, node, kind, job, vals, options))
    leaves = [x for _, x in flat]
    for i, node, marker, vals in recovered:  # restored layers: marked again, sizes back
        _marks.mark(*(x for x, _ in vals.values()))
        if _find.grows(node, vals):
            leaves[i] = PreparedLayer(node.obj, hidden_size=marker["hidden"],
                                      intermediate_size=marker["intermediate"])
    built = []  # (leaf index, node, kind, arrays, vals, marker values, sizes) of layers done

    def rebuild():  # the done layers into ``leaves``, their markers in one transfer
        try:
            markers = _marks.marker_arrays([b[5] for b in built], [b[3][0] for b in built])
        except Exception:  # noqa: BLE001 - e.g. the device is out of memory after a failure
            # The layers stay prepared (and marked in this process), without marker leaves.
            markers = [None] * len(built)
        for (i, node, kind, arrays, vals, _, sizes), marker in zip(built, markers):
            leaves[i] = _rebuilt(node, kind, arrays, vals, km, marker, sizes=sizes,
                                 prepared=True)
        built.clear()

    for k, (i, path, node, kind, job, vals, options) in enumerate(jobs):
        fused = None
        try:
            if kind == "separate":
                fused = _fuse._fuse(tuple(vals[n][0] for n in _find.SEPARATE), donate=donate)
                job = plan_job(fused + (vals["w2_weight"][0], vals["w2_weight_scale"][0]),
                               **options)
                try:
                    arrays = run_job(job)
                finally:
                    if not donate:  # our own temporaries
                        for x in fused:
                            x.delete()
            else:
                arrays = _fuse.run_ordered(job, w13_order, lambda j: run_job(j))
        except Exception as err:  # noqa: BLE001 - re-raised with what was done so far
            if fused is not None and donate and not any(x.is_deleted() for x in fused) \
                    and _find.grows(node, vals):
                # the halves are gone: keep the fused (unprepared) w13 in the layer
                leaves[i] = _rebuilt(node, kind, fused + tuple(vals[n][0] for n in NAMES[2:]),
                                     vals, km, None)
            done = [p for _, p, *_ in jobs[:k]]
            rebuild()
            raise PrepareError(
                f"prepare: layer params{path} failed while running ({type(err).__name__}: "
                f"{err}); the {k} layer(s) before it are prepared and returned in this "
                "error's .params (with the failing and later layers as passed in); resume "
                "with prepare(err.params, skip_prepared=True)",
                params=jax.tree_util.tree_unflatten(treedef, leaves), path=path,
                prepared=done, remaining=[p for _, p, *_ in jobs[k:]]) from err
        valid = job.valid  # the model's sizes (the job's spec may be per device)
        built.append((i, node, kind, arrays, vals, _marks.marker_values(
            gated=gated, experts=valid.experts, hidden=valid.hidden,
            intermediate=valid.intermediate, padded_h=2 * arrays[0].shape[2],
            padded_i=2 * arrays[2].shape[2]), (valid.hidden, valid.intermediate)))
    rebuild()
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_marker(marker, arrays, where):
    w13, w2 = arrays["w13_weight"], arrays["w2_weight"]
    want = (marker["experts"], marker["padded_h"], marker["padded_i"])
    got = (int(w13.shape[0]), 2 * int(w13.shape[2]), 2 * int(w2.shape[2]))
    if want != got:
        raise ValueError(f"{where}: the layout marker says E, Hp, Ip = {want}, but the arrays "
                         f"have {got}; the marker belongs to other arrays (remove it if these "
                         "arrays are in the checkpoint layout)")


def _check_separate(node, path, vals, km, options):
    """Everything a separate gate/up layer is checked for before its halves are fused."""
    where = options["where"]
    arrays = {c: v[0] for c, v in vals.items()}
    if not options["gated"]:
        raise ValueError(f"params{path}: separate gate ({km['w1_weight']!r}) and up "
                         f"({km['w3_weight']!r}) need gated=True (a non-gated w13 is up only: "
                         "map it with keys={'w13_weight': ...})")
    if not _find.grows(node, vals):
        what = (f"a {type(node.obj).__name__}" if not isinstance(node.obj, dict) else
                "a dict of wrapped arrays (e.g. an nnx State, whose structure nnx.merge checks)")
        raise ValueError(
            f"params{path}: separate gate and up ({km['w1_weight']!r}, {km['w3_weight']!r}) in "
            f"{what} cannot become one w13 in place of its fields; fuse them in the model "
            "with jax_nvfp4.fuse_gate_up (one w13_weight and w13_weight_scale) or pass the "
            "layer as a dict of arrays")
    names = tuple(km[n] for n in _find.SEPARATE)
    stand = _fuse.check_halves(*(arrays[n] for n in _find.SEPARATE), where=where, names=names)
    w2 = (arrays["w2_weight"], arrays["w2_weight_scale"])
    spec = check_arrays(stand + w2, gated=True, where=where,
                        hidden_alignment=options["hidden_alignment"])
    _sharding.plan(stand + w2, gated=True, prepared=False, where=where,
                   hidden_alignment=options["hidden_alignment"])
    resolve_backend(options["backend"], [arrays["w1_weight"], arrays["w1_weight_scale"], *w2],
                    auto_triton=False)
    experts_per_chunk(spec, options["chunk_bytes"])
    for n, x, copy in zip(NAMES[2:], w2, _marks.copies(list(w2))):
        if _marks.is_marked(x) or copy:
            raise ValueError(f"{where}{km[n]} is already in the TRT-LLM layout (it came out of "
                             "prepare); preparing it again would shuffle it twice")


def _rebuilt(node, kind, arrays, vals, km, marker, sizes=(None, None), prepared=False):
    """The layer ``node`` with the four ``arrays`` (and ``marker``, where not None) in place
    (see prepare); ``prepared``: the arrays are in the TRT-LLM layout (else: a failed layer's
    fused w13, unprepared)."""
    wrap = {n: vals[n][1] for n in NAMES[2:]}
    if kind == "fused":
        wrap.update((n, vals[n][1]) for n in NAMES[:2])
    else:  # the fused w13 goes into the gate's wrapper kind
        wrap["w13_weight"], wrap["w13_weight_scale"] = (vals["w1_weight"][1],
                                                       vals["w1_weight_scale"][1])
    index = node.names.get(km[MARKER_KEY])
    marker_wrap = _find.unwrap(node.children[index])[1] if index is not None else None
    if _find.grows(node, vals):
        drop = {km[n] for n in _find.SEPARATE} if kind == "separate" else set()
        out = {k: v for k, v in node.obj.items() if k not in drop}
        out.update((km[n], _find.rewrap(x, wrap[n])) for n, x in zip(NAMES, arrays))
        if not prepared:
            return out  # a failed layer, unprepared
        if marker is not None:
            out[km[MARKER_KEY]] = _find.rewrap(marker, marker_wrap)
        return PreparedLayer(out, hidden_size=sizes[0], intermediate_size=sizes[1])
    children = list(node.children)
    for n, x in zip(NAMES, arrays):
        children[node.names[km[n]]] = _find.rewrap(x, wrap[n])
    if index is not None and marker is not None:
        children[index] = _find.rewrap(marker, marker_wrap)
    return jax.tree_util.tree_unflatten(node.treedef, children)
