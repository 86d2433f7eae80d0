"""prepare(params): every MoE layer of a model's params pytree."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from . import _marks
from ._prepare import plan_job, run_job
from ._spec import DEFAULT_HIDDEN_ALIGNMENT, NAMES


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
    ``jax.device_put`` and the like.

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


def is_prepared(layer) -> bool:
    """Whether a layer mapping (or one array) is already in the TRT-LLM layout."""
    if isinstance(layer, PreparedLayer):
        return True
    if _is_layer(layer):
        return any(_marks.is_marked(layer[n]) for n in NAMES)
    return _marks.is_marked(layer)


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
            skip_prepared: bool = False):
    """Prepare every NVFP4 MoE layer of a params pytree for the TRT-LLM kernel.

    Every mapping in ``params`` holding the keys ``w13_weight``, ``w13_weight_scale``,
    ``w2_weight`` and ``w2_weight_scale`` is one MoE layer (see
    :func:`prepare_layer` for their shapes and dtypes). It comes back as a
    :class:`PreparedLayer` (a ``dict``) with those four arrays prepared (padded to
    ``hidden_alignment`` and the kernel's ``I``), its ``.hidden_size`` and
    ``.intermediate_size`` the layer's valid ``H`` and ``I``, and its other entries
    unchanged. Every other leaf is returned as the same object and the tree keeps its
    structure.

    All layers are validated before any buffer is donated. Options are those of
    :func:`prepare_layer` and apply to every layer. ``skip_prepared``: return layers
    already prepared as they are instead of refusing them (to resume after a
    :class:`PrepareError`).

    Layers run one after the other. If one fails while running (out of memory, say),
    nothing is lost: :class:`PrepareError` carries the tree with every earlier layer
    prepared (``err.params``) and the failing and later layers as passed in; resume with
    ``prepare(err.params, skip_prepared=True)``.

    Raises
    ------
    ValueError
        No MoE layer in ``params``; a layer already prepared (a
        :class:`PreparedLayer` or arrays that came out of ``prepare``); an array
        shared between layers while donating; or any :func:`prepare_layer`
        refusal, naming the layer's path. Nothing is donated when this is raised.
    TypeError
        A wrong dtype, naming the layer's path; tracers (``prepare`` cannot run under
        ``jax.jit``).
    PrepareError
        A layer failed while running, after validation (see above).
    """
    if not isinstance(skip_prepared, bool):
        raise TypeError(f"skip_prepared must be a bool, got {skip_prepared!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_layer)
    layers = [(i, jax.tree_util.keystr(p)) for i, (p, x) in enumerate(flat) if _is_layer(x)]
    if not layers:
        raise ValueError(
            f"no MoE layer found: no mapping in params holds all of the keys {NAMES}"
        )
    seen: dict[int, str] = {}
    jobs = []
    for i, path in layers:
        layer = flat[i][1]
        if is_prepared(layer):
            if skip_prepared:
                continue
            raise ValueError(
                f"params{path} is already in the TRT-LLM layout; prepare() refuses to "
                "shuffle it twice (nothing was changed or donated)"
            )
        job = plan_job((layer[n] for n in NAMES), gated=gated, donate=donate, backend=backend,
                       chunk_bytes=chunk_bytes, inverse=False, where=f"params{path}.",
                       hidden_alignment=hidden_alignment, caller="prepare")
        for n, x in zip(NAMES, job.arrays):
            if donate and id(x) in seen:
                raise ValueError(
                    f"params{path}.{n} is the same array as {seen[id(x)]}; it cannot be "
                    "donated twice (pass donate=False)"
                )
            seen[id(x)] = f"params{path}.{n}"
        jobs.append((i, path, job))
    leaves = [x for _, x in flat]
    for k, (i, path, job) in enumerate(jobs):  # every layer validated: now one at a time
        valid = job.valid  # the model's sizes (the job's spec may be per device)
        try:
            arrays = run_job(job)
        except Exception as err:  # noqa: BLE001 - re-raised with what was done so far
            done = [p for _, p, _ in jobs[:k]]
            raise PrepareError(
                f"prepare: layer params{path} failed while running ({type(err).__name__}: "
                f"{err}); the {k} layer(s) before it are prepared and returned in this "
                "error's .params (with the failing and later layers as passed in); resume "
                "with prepare(err.params, skip_prepared=True)",
                params=jax.tree_util.tree_unflatten(treedef, leaves), path=path,
                prepared=done, remaining=[p for _, p, _ in jobs[k:]]) from err
        out = PreparedLayer(leaves[i], hidden_size=valid.hidden,
                            intermediate_size=valid.intermediate)
        out.update(zip(NAMES, arrays))
        leaves[i] = out
    return jax.tree_util.tree_unflatten(treedef, leaves)
