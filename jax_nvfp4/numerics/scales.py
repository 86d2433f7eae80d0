"""kernel_scales: the per-expert scalars and the activation global scale of the TRT-LLM kernel.

ModelOpt stores, per expert and projection, ``weight_scale_2`` (the weight's global
scale: real weight = e2m1 x e4m3 block scale x ``weight_scale_2``) and
``input_scale`` (the activation's: real activation = e2m1 x block scale x
``input_scale``). flashinfer's ``trtllm_fp4_block_scale_moe`` takes three float32
vectors built from them, and its input activations quantized with one global scale.
The arithmetic, rounding order included, is vLLM 0.33's and sglang's for the
flashinfer TRT-LLM backend, keeping the gate's and the up projection's
``weight_scale_2`` apart as the kernel allows (sglang PR #27588, TensorRT-LLM
PR #18772), where vLLM uses the gate's for both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KERNEL_NAMES = ("output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar",
                "hidden_states_global_scale")
_ARGS = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")
_F32 = np.dtype(np.float32)


def _w13_shapes(e, gated: bool) -> tuple[tuple, ...]:
    return ((e, 2), (e,)) if gated else ((e,), (e, 1))


def _fmt(shapes) -> str:
    return " or ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)


def _check(arrays: dict, gated: bool) -> None:
    """Types, dtypes, shapes; positive finite values where they are concrete."""
    for name, x in arrays.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"kernel_scales: {name}: expected an array, got {type(x).__name__}")
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted():
            raise ValueError(f"kernel_scales: {name} has been deleted (donated earlier)")
        if np.dtype(x.dtype) != _F32:
            raise TypeError(
                f"kernel_scales: {name}: expected float32, got {np.dtype(x.dtype).name}")
    s13 = arrays["w13_weight_scale_2"]
    cols = ", columns gate, up" if gated else ""
    if tuple(s13.shape) not in _w13_shapes(s13.shape[0] if s13.shape else 0, gated) \
            or s13.shape[0] == 0:
        raise ValueError(
            f"kernel_scales: w13_weight_scale_2: expected shape {_fmt(_w13_shapes('E', gated))} "
            f"(E > 0 experts{cols}) with gated={gated}, got {list(s13.shape)}")
    e = s13.shape[0]
    want = {"w13_input_scale": _w13_shapes(e, gated), "w2_weight_scale_2": ((e,),),
            "w2_input_scale": ((e,),)}
    for name, x in arrays.items():
        if name in want and tuple(x.shape) not in want[name]:
            what = cols if name.startswith("w13") else ""
            raise ValueError(
                f"kernel_scales: {name}: expected shape {_fmt(want[name])} (E={e} experts as "
                f"w13_weight_scale_2{what}) with gated={gated}, got {list(x.shape)}")
    for name, x in arrays.items():
        if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array)
                                              and not x.is_fully_addressable):
            continue  # values unknown here (under jit) or not all on this host
        v = np.asarray(x)
        bad = ~(np.isfinite(v) & (v > 0))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"kernel_scales: {name}[{', '.join(map(str, where))}] = {float(v[where])} is not a "
                f"positive finite scale ({int(bad.sum())} of {v.size} are not): the checkpoint "
                "is broken (every weight_scale_2 and input_scale must be finite and > 0)")


def reciprocal(a):
    """``1 / a`` for float32 ``a``, correctly rounded (to nearest even) on every backend.

    XLA on CUDA divides float32 with ``div.full.f32``, which is off by an ulp for about
    a quarter of the quotients (openxla/xla#37181), where torch, numpy and XLA on CPU
    round correctly. So the quotient is computed exactly here: ``2**48 // M`` by long
    division on the 24-bit significand ``M`` (uint32), rounded with its remainder.
    Ties cannot occur (a reciprocal of a float is never a midpoint). Outside normal
    ``a`` with a normal reciprocal (``a`` beyond about ``2**+-125``, zero, inf, NaN)
    it is the backend's ``1 / a``.
    """
    a = jnp.asarray(a, jnp.float32)
    u32 = jnp.uint32
    bits = lax.bitcast_convert_type(a, u32)
    e = (bits >> 23) & u32(0xFF)
    m = bits & u32(0x7FFFFF)
    sig = m | u32(0x800000)

    def step(_, carry):  # one bit of floor(2**48 / sig); the remainder stays < 2**24
        r, q = carry
        r = r << 1
        ge = r >= sig
        return jnp.where(ge, r - sig, r), (q << 1) | ge.astype(u32)

    r, q = lax.fori_loop(0, 48, step, (jnp.ones_like(sig), jnp.zeros_like(sig)))
    # sig > 2**23: q in (2**24, 2**25), 1/a = q / 2**25 * 2**(127 - e) (its last bit rounds)
    half = q >> 1
    up = ((q & u32(1)) == 1) & ((r != 0) | ((half & u32(1)) == 1))
    general = ((u32(253) - e) << 23) | ((half + up.astype(u32)) - u32(0x800000))
    power_of_two = (u32(254) - e) << 23  # m == 0: exact
    out = lax.bitcast_convert_type(jnp.where(m == 0, power_of_two, general), jnp.float32)
    ok = (a > 0) & (e >= 1) & (e <= 252)
    return jnp.where(ok, out, jnp.float32(1) / a)


@functools.partial(jax.jit, static_argnames="gated")
def _compute(s13, a13, s2, a2_in, *, gated: bool):
    f32 = jnp.float32
    if s13.ndim == 2:
        s_gate, s_up = s13[:, 0], s13[:, -1]  # [E, 1] (not gated): both are the one column
    else:
        s_gate = s_up = s13
    a1 = jnp.max(a13)
    a2 = jnp.max(a2_in)
    inv_a2 = reciprocal(a2)
    gate = a1 * s_gate
    # (a1 * s_up) * (1 / a2), rounded in this order as vLLM and sglang do.
    out1 = (a1 * s_up) * inv_a2 if gated else jnp.broadcast_to(inv_a2, s_gate.shape)
    return {"output1_scale_scalar": out1.astype(f32),
            "output1_scale_gate_scalar": gate.astype(f32),
            "output2_scale_scalar": (a2 * s2).astype(f32),
            "hidden_states_global_scale": reciprocal(a1).astype(f32)}


def kernel_scales(w13_weight_scale_2, w13_input_scale, w2_weight_scale_2, w2_input_scale, *,
                  gated: bool = True) -> dict:
    """The float32 scalars of ``trtllm_fp4_block_scale_moe`` from a layer's checkpoint scales.

    Parameters
    ----------
    w13_weight_scale_2 : float32 array, ``[E, 2]`` (columns gate, up) or ``[E]``
        Each expert's ``weight_scale_2`` of the gate (w1) and up (w3) projections, as
        :func:`load` gives them; ``[E]`` when gate and up share one. Not gated
        (``gated=False``, e.g. ReLU^2 experts with only an up projection): ``[E]`` or
        ``[E, 1]``.
    w13_input_scale : float32 array, same shapes as ``w13_weight_scale_2``
        The ``input_scale`` of the same projections.
    w2_weight_scale_2, w2_input_scale : float32 arrays ``[E]``
        The down projection's (w2).
    gated : bool, keyword-only
        Gated activation (SwiGLU: w13 is ``[up; gate]``) or not (ReLU^2: w13 is up only).

    Returns
    -------
    dict of float32 jax arrays, keyed by the kernel's argument names. With
    ``a1 = max(w13_input_scale)`` and ``a2 = max(w2_input_scale)`` (over every expert,
    gate and up), ``s_gate``, ``s_up`` the columns of ``w13_weight_scale_2`` and
    ``s2 = w2_weight_scale_2``, per expert ``e``:

    ``output1_scale_gate_scalar`` ``[E]``
        ``a1 * s_gate[e]``: dequantizes GEMM1's gate half (not gated: all of GEMM1,
        ``a1 * s[e]``, before the activation).
    ``output1_scale_scalar`` ``[E]``
        gated: ``(a1 * s_up[e]) * (1 / a2)``: dequantizes GEMM1's up half and
        requantizes the activation's output for GEMM2 (global scale ``1 / a2``).
        Not gated: ``1 / a2``.
    ``output2_scale_scalar`` ``[E]``
        ``a2 * s2[e]``: dequantizes GEMM2.
    ``hidden_states_global_scale`` ``[]``
        ``1 / a1``: the global scale to quantize the kernel's input activations with
        (``fp4_quantize(x, global_scale)``).

    Each product and quotient is one float32 operation, correctly rounded in the order
    written, which is vLLM 0.33's and sglang's; with equal gate and up scales the values
    are bit for bit theirs, on every backend (the reciprocals are computed exactly, not
    with XLA's approximate float32 division on CUDA). Jittable. ``a1`` and ``a2`` are
    maxima over the arrays given: pass every expert's scales (global arrays, also when
    sharded), not one device's experts inside ``shard_map``, or devices would quantize
    differently.

    Raises
    ------
    TypeError
        An argument that is not a float32 array.
    ValueError
        A shape other than those above (the array is named), or, for concrete values,
        a scale that is zero, negative, infinite or NaN (a broken checkpoint).
    """
    if not isinstance(gated, bool):
        raise TypeError(f"kernel_scales: gated must be a bool, got {gated!r}")
    arrays = dict(zip(_ARGS, (w13_weight_scale_2, w13_input_scale, w2_weight_scale_2,
                              w2_input_scale)))
    _check(arrays, gated)
    return _compute(*arrays.values(), gated=gated)
