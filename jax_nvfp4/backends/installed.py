"""Whether an optional package is installed, cheap enough to ask on every call."""

from __future__ import annotations

import importlib.util

# (module, the finder asked) of modules found: ``importlib.util.find_spec`` of a module not
# yet imported searches sys.path (50-70 us a call on CPU), and ``backend="auto"`` asks on
# every call, imported or not. Keyed by the finder too, so a patched ``find_spec`` (the tests'
# way to uninstall a package) is asked afresh.
_FOUND: set = set()


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (found once: remembered for the process)."""
    find = importlib.util.find_spec
    if (module, find) in _FOUND:
        return True
    if find(module) is None:
        return False
    _FOUND.add((module, find))
    return True
