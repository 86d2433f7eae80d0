"""MoE layers in any pytree: which nodes are layers, under which names, and how they come back.

A *layer* is a pytree node (a dict, a flax ``nnx.State`` or ``FrozenDict``, a registered
dataclass, a NamedTuple, any node registered with keys, or an unregistered ``Mapping``)
whose children, named by their pytree keys (``DictKey`` / ``GetAttrKey``), include

* fused: ``w13_weight``, ``w13_weight_scale``, ``w2_weight``, ``w2_weight_scale``, or
* separate gate and up: ``w1_weight``, ``w1_weight_scale`` (gate), ``w3_weight``,
  ``w3_weight_scale`` (up), ``w2_weight``, ``w2_weight_scale``;

each name through the key map (``prepare(keys=...)``). A child may be an array or a
wrapper pytree holding exactly one array (flax ``nnx.Param``/``Variable``, linen's
``Partitioned``): the array is prepared and put back into the same wrapper (its metadata
kept). ``nvfp4_layout`` (through the map too) names the marker leaf (``_marks``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping

import jax
import numpy as np

from .marks import MARKER_KEY
from ..layout.spec import NAMES

SEPARATE = ("w1_weight", "w1_weight_scale", "w3_weight", "w3_weight_scale")
CANONICAL = NAMES + SEPARATE + (MARKER_KEY,)
_FUSED = NAMES
_SPLIT = SEPARATE + NAMES[2:]


def key_map(keys) -> dict:
    """``{canonical name: the model's name}`` for every canonical name, validated."""
    out = {n: n for n in CANONICAL}
    if keys is None:
        return out
    if not isinstance(keys, Mapping):
        raise TypeError(f"keys must be a mapping {{canonical name: the model's name}}, e.g. "
                        f"{{'w13_weight': 'gate_up_proj'}}, got {type(keys).__name__}")
    for canon, name in keys.items():
        if canon not in out:
            close = difflib.get_close_matches(str(canon), CANONICAL, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"keys: {canon!r} is not a canonical name{hint}; the names are "
                             f"{CANONICAL}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"keys[{canon!r}]: expected the model's name (a non-empty str), "
                            f"got {name!r}")
        out[canon] = name
    seen: dict = {}
    for canon, name in out.items():
        if name in seen:
            raise ValueError(f"keys: {seen[name]!r} and {canon!r} both map to {name!r}; each "
                             "canonical name needs its own key in the model (map the other "
                             "one too if the model uses its canonical name for something else)")
        seen[name] = canon
    return out


def _name(key):
    if isinstance(key, jax.tree_util.DictKey):
        return key.key if isinstance(key.key, str) else None
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return None


@dataclasses.dataclass
class Node:
    """One level of a pytree node: its named children and how to rebuild it."""

    obj: object
    names: dict  # name -> index into children
    children: list
    treedef: object  # one-level treedef; None for an unregistered Mapping


def children(obj) -> Node | None:
    """The named children of ``obj`` (None for leaves and nodes without named children)."""
    if obj is None or isinstance(obj, (jax.Array, np.ndarray, str, bytes, int, float, complex)):
        return None
    try:
        flat, treedef = jax.tree_util.tree_flatten_with_path(obj, is_leaf=lambda y: y is not obj)
    except Exception:  # noqa: BLE001 - not a pytree we can read: a leaf
        return None
    if len(flat) == 1 and flat[0][0] == ():  # a leaf of jax's
        if isinstance(obj, Mapping):
            items = list(obj.items())
            return Node(obj, {k: n for n, (k, _) in enumerate(items) if isinstance(k, str)},
                        [v for _, v in items], None)
        return None
    names = {}
    for n, (path, _) in enumerate(flat):
        name = _name(path[0]) if len(path) == 1 else None
        if name is not None:
            names.setdefault(name, n)
    if not names:
        return None
    return Node(obj, names, [x for _, x in flat], treedef)


def classify(node: Node, km: dict) -> str | None:
    """``"fused"``, ``"separate"`` or None."""
    fused = all(km[n] in node.names for n in _FUSED)
    split = all(km[n] in node.names for n in _SPLIT)
    if fused and split:
        return "both"
    return "fused" if fused else "separate" if split else None


def near_miss(node: Node, km: dict) -> str | None:
    """Why ``node`` looks like a broken layer (all but one name of a form present, or every
    missing name close to one of its keys), or None."""
    other = [k for k in node.names if k not in km.values()]
    best = None
    for form in (_FUSED, _SPLIT):
        want = [km[n] for n in form]
        have = [n for n in want if n in node.names]
        missing = [n for n in want if n not in node.names]
        if not missing or len(have) < 2:
            continue
        close = {m: difflib.get_close_matches(m, other, n=1, cutoff=0.8) for m in missing}
        if len(missing) == 1 or all(close.values()):
            hints = "; ".join(f"{m!r} missing" + (f" (it has {c[0]!r}: misspelt? map it with "
                                                  f"keys={{{_canon(km, m)!r}: {c[0]!r}}})"
                                                  if c else "") for m, c in close.items())
            best = best or (f"has {have} but not all of {want}: {hints}")
    return best


def _canon(km, name):
    return next(c for c, n in km.items() if n == name)


def unwrap(x):
    """``(array, wrapper treedef or None)``: the array inside a one-array wrapper pytree."""
    if x is None or isinstance(x, (jax.Array, np.ndarray)):
        return x, None
    try:
        leaves, treedef = jax.tree_util.tree_flatten(x)
    except Exception:  # noqa: BLE001
        return x, None
    if len(leaves) == 1 and leaves[0] is not x and hasattr(leaves[0], "shape") \
            and hasattr(leaves[0], "dtype"):
        return leaves[0], treedef
    return x, None


def rewrap(x, treedef):
    return x if treedef is None else jax.tree_util.tree_unflatten(treedef, [x])


def grows(node: Node, vals: dict) -> bool:
    """Whether prepare may rename/add keys: plain dicts (and unregistered Mappings) of bare
    arrays. A dict of wrapped arrays (``nnx.Param``: flax's ``nnx.State`` holds nested
    dicts) belongs to a framework that checks its structure (``nnx.merge``): kept as is."""
    return ((isinstance(node.obj, dict) or node.treedef is None)
            and all(wrapper is None for _, wrapper in vals.values()))


def candidates(flat) -> list[str]:
    """Paths of nodes holding two or more rank-3 byte arrays (possible expert containers)."""
    count: dict = {}
    for path, x in flat:
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
        if shape is None or dtype is None or len(shape) != 3:
            continue
        try:
            if np.dtype(dtype).itemsize != 1:
                continue
        except TypeError:
            continue
        parent = tuple(path[:-1])
        if parent and isinstance(parent[-1], jax.tree_util.GetAttrKey) \
                and parent[-1].name in ("value", "raw_value"):
            parent = parent[:-1]  # the array inside an nnx.Variable
        if parent:
            count.setdefault(parent, []).append(_name(path[-1]) if _name(path[-1]) not in
                                                ("value", "raw_value") else _name(path[-2]))
    return [f"params{jax.tree_util.keystr(p)} (holds {names})" for p, names in count.items()
            if len(names) >= 2][:3]
