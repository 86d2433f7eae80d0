"""Which live arrays are already in the TRT-LLM layout.

jax.Array is unhashable and takes no attributes, so prepared arrays are
remembered by ``id`` with a weak reference that drops the entry when the
array dies (and guards against ``id`` reuse).
"""

from __future__ import annotations

import weakref

_PREPARED: dict[int, weakref.ref] = {}


def mark(*arrays) -> None:
    """Remember ``arrays`` as prepared."""
    for x in arrays:
        key = id(x)
        try:
            _PREPARED[key] = weakref.ref(x, lambda _, key=key: _PREPARED.pop(key, None))
        except TypeError:  # numpy or other non-weakrefable arrays cannot be marked
            pass


def is_marked(x) -> bool:
    """Whether ``x`` came out of ``prepare``/``prepare_layer`` (or a prepared checkpoint)."""
    ref = _PREPARED.get(id(x))
    return ref is not None and ref() is x

