"""dequantize_layer: the float values of one NVFP4 MoE layer, from either layout.

For looking at weights (and debugging a model that produces garbage): the
prepared TRT-LLM arrays are read directly, their row permutation and scale
swizzle undone by the same inverse transforms ``unprepare_layer`` runs.
Everything is per expert along axis 0, so an expert-sharded layer stays
sharded and nothing crosses devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from ..tree import marks as _marks, sharding as _sharding
from .. import options as _options
from ..backends import xla
from ..layout.spec import BLOCK, NAMES, SCALE_DTYPE, LayerSpec, check_arrays

LAYOUTS = ("linear", "trtllm")

# e2m1: sign (bit 3), exponent (bits 2-1), mantissa (bit 0); indexed by the nibble.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
E2M1_LUT = np.concatenate([E2M1_VALUES, -E2M1_VALUES])


def _e2m1(packed):
    """uint8 ``[E, R, K/2]`` -> float32 ``[E, R, K]``; the low nibble is the even element."""
    nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return jnp.asarray(E2M1_LUT)[nibbles].reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _e4m3(scales):
    """float8_e4m3fn (or its uint8 bytes) -> float32, same shape."""
    if scales.dtype != SCALE_DTYPE:
        scales = lax.bitcast_convert_type(scales, SCALE_DTYPE)
    return scales.astype(jnp.float32)


def _dequantize(weight, scale):
    """``e2m1(weight) * scale`` with one scale per 16 consecutive values of a row."""
    values = _e2m1(weight)
    e, r, k = values.shape
    blocks = values.reshape(e, r, k // BLOCK, BLOCK) * scale[..., None]
    return blocks.reshape(e, r, k)


@functools.lru_cache(maxsize=64)
def _program(spec: LayerSpec, layout: str, fuse_scales: bool):
    # Linear: the identity; TRT-LLM: the inverse transforms of unprepare_layer.
    # Scales become float32 before their swizzle is undone: the permutation
    # does not care about the dtype, and float32 sidesteps float8 data movement
    # (computed in float16 by XLA's CPU backend).
    undo = ([fn for fn, _ in xla.transforms(spec, inverse=True, fuse_scales=fuse_scales)]
            if layout == "trtllm"
            else (lambda x: x,) * 4)

    def program(w13, s13, w2, s2):
        return (_dequantize(undo[0](w13), undo[1](_e4m3(s13))),
                _dequantize(undo[2](w2), undo[3](_e4m3(s2))))

    return jax.jit(program)


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.core.Tracer) else x


def dequantize_layer(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, *,
                     gated: bool = True, layout: str = "linear"):
    """The float values of one NVFP4 MoE layer: e2m1 weights times their e4m3 block scales.

    Global (per-tensor float32) scales are not applied: multiply by them yourself.

    Parameters
    ----------
    w13_weight, w13_weight_scale, w2_weight, w2_weight_scale
        One layer's four arrays as :func:`prepare_layer` takes them (``layout="linear"``)
        or returns them (``layout="trtllm"``): uint8 packed e2m1 weights (low nibble =
        even element) ``[E, R1, H/2]`` and ``[E, H, I/2]``, float8_e4m3fn (or uint8)
        scales ``[E, R1, H/16]`` and ``[E, H, I/16]``. jax or numpy arrays, tracers
        included (the function is jittable), sharded along the experts or not.
    gated : bool, keyword-only
        Whether w13 holds ``[up (w3); gate (w1)]`` (``R1 = 2I``), else ``R1 = I``.
    layout : {"linear", "trtllm"}, keyword-only
        ``"linear"``: the checkpoint layout. ``"trtllm"``: the arrays came out of
        :func:`prepare_layer`; their row permutation and scale swizzle are undone
        (the inverse transforms of :func:`unprepare_layer`), so the result equals
        ``layout="linear"`` on the original arrays, bit for bit.

    Returns
    -------
    w13 : float32 ``[E, R1, H]``
        Rows ``[up; gate]`` (gated) in checkpoint order.
    w2 : float32 ``[E, H, I]``

    With ``layout="trtllm"`` and a padded layer (``prepare_layer`` padded ``H`` to
    ``Hp``, a multiple of its ``hidden_alignment``, and ``I`` to ``Ip``, a multiple of 64
    gated or 128 not gated), the result has the padded shapes ``[E, 2 Ip, Hp]``
    (``[E, Ip, Hp]`` not gated) and ``[E, Hp, Ip]``: rows ``I..Ip`` of each half of w13,
    its columns ``H..Hp``, and rows ``H..Hp`` and columns ``I..Ip`` of w2 are zeros. Drop
    them with ``w13.reshape(E, 2, Ip, Hp)[:, :, :I, :H].reshape(E, 2 * I, H)`` (not gated:
    ``w13[:, :I, :H]``) and ``w2[:, :H, :I]`` to get exactly the unpadded layer (``H``
    and ``I``: a :class:`PreparedLayer`'s ``.hidden_size`` and ``.intermediate_size``).

    Every stored value is returned as is: a scale byte that is NaN in
    float8_e4m3fn (``0x7f``, ``0xff``) gives NaN for its 16 values. The result
    is 8 bytes per packed byte: slice a few experts of a large layer first.

    Arrays sharded like :func:`prepare_layer` accepts them (``NamedSharding`` over the
    experts, and over ``I`` for tensor parallelism) are dequantized where they lie, each
    device's block as its own layer, and the results are split like the weights.
    Under a caller's ``jax.jit`` the function is traced as one program instead (the
    expert-local work needs no communication there either).

    Raises
    ------
    TypeError, ValueError
        As :func:`prepare_layer` for inconsistent arrays; ``ValueError`` for an
        unknown ``layout``, for ``layout="trtllm"`` with an unprepared size of
        ``H`` or ``I`` (H a multiple of 128, I of 64 gated or 128 not), for empty arrays,
        and for ``layout="linear"`` on arrays that came out of ``prepare``.
    """
    arrays = (w13_weight, w13_weight_scale, w2_weight, w2_weight_scale)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {gated!r}")
    # Under jit the arrays are tracers: check their shapes and dtypes only.
    spec = check_arrays([_abstract(x) for x in arrays], gated=gated, prepared=layout == "trtllm")
    if layout == "linear":
        for name, x in zip(NAMES, arrays):
            if _marks.is_marked(x):
                raise ValueError(
                    f"{name} is in the TRT-LLM layout (it came out of prepare); read it "
                    "with layout='trtllm'"
                )
    fuse = _options.current().fuse_scales  # the inverse's steps: part of the cache keys
    if any(isinstance(x, jax.core.Tracer) for x in arrays):
        return _program(spec, layout, fuse)(*arrays)
    plan = _sharding.plan(arrays, gated=gated, prepared=layout == "trtllm")
    if plan is None:
        return _program(spec, layout, fuse)(*arrays)
    return _sharded_program(plan, layout, fuse)(*arrays)


@functools.lru_cache(maxsize=64)
def _sharded_program(plan, layout: str, fuse_scales: bool):
    # Each device dequantizes its own block as its own layer (expert and, for tensor
    # parallelism, intermediate splits), as prepare does: no communication, and the
    # float outputs are split like the weights they come from.
    specs = tuple(s.spec for s in plan.shardings)
    mapped = _sharding.shard_map(_program(plan.local, layout, fuse_scales), plan.mesh,
                                 in_specs=specs,
                                 out_specs=(specs[0], specs[2]))
    return jax.jit(mapped, out_shardings=(plan.shardings[0], plan.shardings[2]))
