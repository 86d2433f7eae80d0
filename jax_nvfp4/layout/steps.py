"""One layer's layout as steps on its four arrays: the ``index.move`` steps of each array,
and the zero padding (and its crop) around them. Pure functions of a ``LayerSpec``; every
backend builds its program from these."""

from __future__ import annotations

import functools
from typing import Callable

from . import index as _layout
from .spec import BLOCK, LayerSpec

Transform = Callable  # one array (a block of experts) -> its result


def moves(spec: LayerSpec, fuse: bool):
    """Per array, the ``index.move`` steps from the checkpoint to the TRT-LLM layout.

    Sizes are those of the padded arrays the steps run on. With ``fuse`` each
    scale array is one transpose (rows and swizzle composed), else rows then swizzle.
    """
    (_, r1, k13w), (_, _, k13), (_, h, k2w), (_, _, k2) = spec.shapes(padded=True)
    rows13 = _layout.gated_rows_move if spec.gated else _layout.rows_move
    if fuse:
        sw13 = _layout.gated_rows_swizzle_move if spec.gated else _layout.rows_swizzle_move
        s13, s2 = [sw13(r1, k13)], [_layout.rows_swizzle_move(h, k2)]
    else:
        s13 = [rows13(r1, k13), _layout.swizzle_move(r1, k13)]
        s2 = [_layout.rows_move(h, k2), _layout.swizzle_move(h, k2)]
    return [rows13(r1, k13w)], s13, [_layout.rows_move(h, k2w)], s2


def apply(steps, inverse: bool) -> Transform:
    """The steps (or their inverse, last first) as one function of an array."""
    if inverse:
        return lambda x: functools.reduce(lambda y, m: _layout.unmove(y, *m), steps[::-1], x)
    return lambda x: functools.reduce(lambda y, m: _layout.move(y, *m), steps, x)


def pads(spec: LayerSpec) -> tuple[Transform, ...]:
    """Zero padding of I to ``spec.padded_i`` and of H to ``spec.padded_h`` (identity when
    none is needed), as vLLM: rows of each half of w13 and columns of w2 for I; columns of
    w13 and rows of w2 (and their scales) for H."""
    ip, hp = spec.padded_i, spec.padded_h
    if not spec.needs_padding:
        return (lambda x: x,) * 4
    if spec.gated:
        def rows13(x):
            return _layout.pad_gated_rows(x, ip)
    else:
        def rows13(x):
            return _layout.pad_rows(x, ip)
    return (lambda x: _layout.pad_cols(rows13(x), hp // 2),
            lambda x: _layout.pad_cols(rows13(x), hp // BLOCK),
            lambda x: _layout.pad_rows(_layout.pad_cols(x, ip // 2), hp),
            lambda x: _layout.pad_rows(_layout.pad_cols(x, ip // BLOCK), hp))


def crops(spec: LayerSpec, crop) -> tuple[Transform, ...]:
    """Inverse of :func:`pads`: prepared (unpadded) arrays of ``spec`` cut back to the valid
    ``crop = (H, I)`` (per device); identity for ``None``."""
    if crop is None:
        return (lambda x: x,) * 4
    h, i = crop
    rows13 = ((lambda x: _layout.crop_gated_rows(x, i)) if spec.gated
              else (lambda x: _layout.crop_rows(x, i)))
    return (lambda x: _layout.crop_cols(rows13(x), h // 2),
            lambda x: _layout.crop_cols(rows13(x), h // BLOCK),
            lambda x: _layout.crop_cols(_layout.crop_rows(x, h), i // 2),
            lambda x: _layout.crop_cols(_layout.crop_rows(x, h), i // BLOCK))


def then(f: Transform, g: Transform) -> Transform:
    """``g`` after ``f``."""
    return lambda x: g(f(x))
