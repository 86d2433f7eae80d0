"""prepare(params): every MoE layer of a model's params pytree."""

from __future__ import annotations

from collections.abc import Mapping

import jax

from . import _marks
from ._prepare import plan_job, run_job
from ._spec import NAMES


class PreparedLayer(dict):
    """A MoE layer mapping whose four arrays are in the TRT-LLM layout.

    A plain ``dict`` in every way (serving code reads the same keys) and a
    pytree node like ``dict``; its type is the mark that makes :func:`prepare`
    refuse to shuffle the layer twice, and it survives ``jax.tree.map``,
    ``jax.device_put`` and the like.
    """

    def __repr__(self) -> str:
        return f"PreparedLayer({dict.__repr__(self)})"


def _flatten(layer):
    keys = sorted(layer)
    return [(jax.tree_util.DictKey(k), layer[k]) for k in keys], tuple(keys)


jax.tree_util.register_pytree_with_keys(
    PreparedLayer, _flatten, lambda keys, children: PreparedLayer(zip(keys, children))
)


def _is_layer(x) -> bool:
    return isinstance(x, Mapping) and all(n in x for n in NAMES)


def is_prepared(layer) -> bool:
    """Whether a layer mapping (or one array) is already in the TRT-LLM layout."""
    if isinstance(layer, PreparedLayer):
        return True
    if _is_layer(layer):
        return any(_marks.is_marked(layer[n]) for n in NAMES)
    return _marks.is_marked(layer)


def prepare(params, *, gated: bool = True, donate: bool = True, backend: str = "auto",
            chunk_bytes: int | None = None):
    """Prepare every NVFP4 MoE layer of a params pytree for the TRT-LLM kernel.

    Every mapping in ``params`` holding the keys ``w13_weight``, ``w13_weight_scale``,
    ``w2_weight`` and ``w2_weight_scale`` is one MoE layer (see
    :func:`prepare_layer` for their shapes and dtypes). It comes back as a
    :class:`PreparedLayer` (a ``dict``) with those four arrays prepared and its
    other entries unchanged. Every other leaf is returned as the same object and
    the tree keeps its structure.

    All layers are validated before any buffer is donated. Options are those of
    :func:`prepare_layer` and apply to every layer.

    Raises
    ------
    ValueError
        No MoE layer in ``params``; a layer already prepared (a
        :class:`PreparedLayer` or arrays that came out of ``prepare``); an array
        shared between layers while donating; or any :func:`prepare_layer`
        refusal, naming the layer's path. Nothing is donated when this is raised.
    TypeError
        A wrong dtype, naming the layer's path.
    """
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
            raise ValueError(
                f"params{path} is already in the TRT-LLM layout; prepare() refuses to "
                "shuffle it twice (nothing was changed or donated)"
            )
        job = plan_job((layer[n] for n in NAMES), gated=gated, donate=donate, backend=backend,
                       chunk_bytes=chunk_bytes, inverse=False, where=f"params{path}.")
        for n, x in zip(NAMES, job.arrays):
            if donate and id(x) in seen:
                raise ValueError(
                    f"params{path}.{n} is the same array as {seen[id(x)]}; it cannot be "
                    "donated twice (pass donate=False)"
                )
            seen[id(x)] = f"params{path}.{n}"
        jobs.append((i, job))
    leaves = [x for _, x in flat]
    for i, job in jobs:  # every layer validated: now donate, one layer at a time
        leaves[i] = PreparedLayer(leaves[i])
        leaves[i].update(zip(NAMES, run_job(job)))
    return jax.tree_util.tree_unflatten(treedef, leaves)
