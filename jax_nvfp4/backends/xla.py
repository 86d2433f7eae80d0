"""``backend="xla"``: each array's steps as XLA reshapes and transposes, the weights' row
moves as Pallas kernels on CUDA (``pallas``; 16-byte accesses where XLA moves a byte per
thread).

The interface shared with ``flashinfer``: :func:`transforms` gives, per array, ``(fn,
write)`` for ``transform``'s chunk loop. ``fn`` maps a block of experts to its result;
``write(buf, start, block)``, where not None, puts the result of ``block`` into ``buf`` at
expert ``start`` itself (a kernel writes there). (``triton`` instead builds the whole
program: its kernels do their own chunking.)
"""

from __future__ import annotations

import numpy as np

from ..layout import steps
from ..layout.spec import LayerSpec


def _pallas_rows(view, perm, pad):
    """``(fn, write)`` of a row move as Pallas kernels (see ``pallas``)."""
    from . import pallas as _pallas  # jax.experimental.pallas: only where it runs

    def fn(x):
        return _pallas.move_rows(pad(x), view, perm)

    def write(buf, start, block):
        moved = _pallas.move_rows(buf, view, perm, start=start, experts=block.shape[0])
        return _pallas.write_block(buf, moved, start)

    return fn, write


def transforms(spec: LayerSpec, *, inverse: bool, pallas: bool = False, crop=None,
               fuse_scales: bool = True):
    """Per array ``(fn, write)`` that prepares (or with ``inverse`` unprepares) ``spec``.

    ``pallas``: the weights' rows (and the scales' copy back) by Pallas kernels where the
    array fits them. ``crop`` (inverse only): the valid ``(H, I)`` to cut the result back
    to. ``fuse_scales``: each scale array's rows and swizzle as one transpose.
    """
    moves = steps.moves(spec, fuse_scales)
    pads = steps.pads(spec) if not inverse else (lambda x: x,) * 4
    if inverse:
        out = [(steps.then(steps.apply(m, True), c), None)
               for m, c in zip(moves, steps.crops(spec, crop))]
    else:
        out = [(steps.then(pad, steps.apply(m, False)), None) for pad, m in zip(pads, moves)]
    if pallas:
        from . import pallas as _pallas
        sizes = [int(np.prod(s)) for s in spec.shapes(padded=True)]
        for k in (0, 2):
            if not _pallas.fits(sizes[k]) or (inverse and crop is not None):
                continue
            (view, perm), = moves[k]
            if inverse:
                view, perm = tuple(view[p] for p in perm), tuple(int(i) for i in np.argsort(perm))
            out[k] = _pallas_rows(view, perm, pads[k])
        for k in (1, 3):  # scales: XLA's transpose into scratch, copied back by a kernel
            if _pallas.fits(sizes[k]):
                out[k] = (out[k][0], (lambda f: lambda buf, start, block:
                                      _pallas.write_block(buf, f(block), start))(out[k][0]))
    return tuple(out)
