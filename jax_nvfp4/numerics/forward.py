"""moe_forward: a reference NVFP4 MoE forward, from the checkpoint or the TRT-LLM layout.

The oracle to check a converted model on any platform (CPU, Hopper): it dequantizes
one expert at a time (a ``lax.fori_loop`` over the experts, each expert's bytes cut
out with ``dynamic_slice``), so peak memory is one expert's float32 weights plus
the activations, never the whole layer. Experts no token is routed to are skipped
(``lax.cond``). Every expert is computed for every token (dense, float32,
``Precision.HIGHEST``), masked by the routing weights: ``O(T x E_routed x H x I)``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .dequant import dequantize_layer
from .quant import dequantize_nvfp4, quantize_nvfp4
from ..layout.spec import NAMES
from ..tree.prepare import PreparedLayer, is_prepared

ACTIVATIONS = ("swiglu", "relu2")
CHECKPOINT_SCALARS = ("w13_weight_scale_2", "w2_weight_scale_2")
KERNEL_SCALARS = ("output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar",
                  "hidden_states_global_scale")
_HI = lax.Precision.HIGHEST


def _shape(x):
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _dot(a, b):
    """``a @ b.T`` in float32 with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI,
                           preferred_element_type=jnp.float32)


def _check_vector(layer, name, e, shapes):
    x = layer[name]
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"layer[{name!r}]: expected a float32 array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if _shape(x) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"layer[{name!r}]: expected shape {want} for E={e} experts, "
                         f"got {list(_shape(x))}")


def _validate(x, layer, topk_ids, topk_weights, activation, quantize_activations):
    """Everything checked before tracing; returns the static configuration."""
    if not isinstance(layer, Mapping):
        raise TypeError(f"layer: expected a mapping (as jax_nvfp4.load returns), "
                        f"got {type(layer).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(quantize_activations, bool):
        raise TypeError(f"quantize_activations must be a bool, got {quantize_activations!r}")
    needed = NAMES + (KERNEL_SCALARS if quantize_activations else CHECKPOINT_SCALARS)
    missing = [n for n in needed if n not in layer]
    if missing:
        hint = (" (jax_nvfp4.kernel_scales computes them from the checkpoint scales; "
                "jax_nvfp4.load puts them in every layer)" if quantize_activations else "")
        raise ValueError(f"layer is missing {missing}{hint}")
    for n in NAMES:
        if not hasattr(layer[n], "shape") or len(layer[n].shape) != 3:
            raise ValueError(f"layer[{n!r}]: expected a rank-3 array, got "
                             f"{getattr(layer[n], 'shape', type(layer[n]).__name__)}")
    w13, w2 = layer["w13_weight"], layer["w2_weight"]
    e, r1, hp, ip = w13.shape[0], w13.shape[1], w2.shape[1], 2 * w2.shape[2]
    gated = activation == "swiglu"
    layer_gated = r1 == 2 * ip
    if r1 not in (ip, 2 * ip):
        raise ValueError(f"layer['w13_weight']: {r1} rows fit neither a gated layer (2 x I = "
                         f"{2 * ip}, I = 2 x w2_weight.shape[2]) nor a non-gated one (I = {ip})")
    if gated != layer_gated:
        raise ValueError(
            f"activation={activation!r} needs a {'gated' if gated else 'non-gated'} layer, but "
            f"w13_weight has {r1} rows = {'2 x ' if layer_gated else ''}I (I = {ip}): use "
            f"activation={'swiglu' if layer_gated else 'relu2'!r}")
    # Layout: a PreparedLayer (or arrays marked by prepare) is in the TRT-LLM layout.
    trtllm = isinstance(layer, PreparedLayer) or is_prepared(layer)
    h_valid = getattr(layer, "hidden_size", None)
    i_valid = getattr(layer, "intermediate_size", None) or ip
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or len(x.shape) != 2:
        raise ValueError(f"x: expected a float array [T, H], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a float dtype, got {jnp.dtype(x.dtype).name}")
    t, h = x.shape
    if trtllm:
        if h_valid is not None and h != h_valid:
            raise ValueError(f"x: expected [T, {h_valid}] (the layer's hidden_size), got "
                             f"{list(x.shape)}")
        if h > hp or h % 16:
            raise ValueError(f"x: hidden size {h} must be a multiple of 16 and at most the "
                             f"layer's padded H = {hp}")
        if i_valid > ip:
            raise ValueError(f"layer.intermediate_size = {i_valid} exceeds the arrays' I = {ip}")
    elif h != hp:
        raise ValueError(f"x: expected [T, {hp}] (H = w2_weight.shape[1]), got {list(x.shape)}")
    for name, a in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not hasattr(a, "shape") or len(a.shape) != 2 or a.shape[0] != t:
            raise ValueError(f"{name}: expected [T, k] with T = {t} (x.shape[0]), got "
                             f"{list(getattr(a, 'shape', ()))}")
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_weights: expected the shape of topk_ids {list(topk_ids.shape)}, "
                         f"got {list(topk_weights.shape)}")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise TypeError(f"topk_ids: expected an integer dtype, got {jnp.dtype(topk_ids.dtype).name}")
    if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
        raise TypeError(f"topk_weights: expected a float dtype, got "
                        f"{jnp.dtype(topk_weights.dtype).name}")
    if not isinstance(topk_ids, jax.core.Tracer):
        ids = np.asarray(topk_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= e):
            raise ValueError(f"topk_ids: expert ids must be in [0, {e}), got "
                             f"{int(ids.min())}..{int(ids.max())}")
    if quantize_activations:
        for n in KERNEL_SCALARS[:3]:
            _check_vector(layer, n, e, ((e,),))
        _check_vector(layer, "hidden_states_global_scale", e, ((), (1,)))
    else:
        _check_vector(layer, "w13_weight_scale_2", e,
                      ((e, 2), (e,)) if gated else ((e,), (e, 1)))
        _check_vector(layer, "w2_weight_scale_2", e, ((e,),))
    return dict(gated=gated, trtllm=trtllm, h=h, i=i_valid,
                quantize=quantize_activations)


def _expert(arrays, e):
    """Expert ``e``'s bytes, ``[1, ...]`` each (``e`` traced)."""
    return [lax.dynamic_slice_in_dim(a, e, 1, axis=0) for a in arrays]


@functools.partial(jax.jit, static_argnames=("gated", "trtllm", "h", "i", "quantize"))
def _forward(x, arrays, scalars, topk_ids, topk_weights, *, gated, trtllm, h, i, quantize):
    t = x.shape[0]
    e_total = arrays[0].shape[0]
    ip = 2 * arrays[2].shape[2]
    combine = jnp.zeros((t, e_total), jnp.float32).at[
        jnp.arange(t)[:, None], topk_ids].add(topk_weights.astype(jnp.float32), mode="drop")
    routed = jnp.zeros((e_total,), bool).at[topk_ids.reshape(-1)].set(True, mode="drop")
    if quantize:
        # The kernel's input: x quantized with 1 / a1, in units of the block scales
        # (x * hidden_states_global_scale); GEMM1's scalars carry a1 back.
        xq = dequantize_nvfp4(*quantize_nvfp4(x, scalars["hidden_states_global_scale"]), 1.0)
    else:
        xq = x.astype(jnp.float32)

    def weights(e):
        # One expert's block-dequantized floats (e2m1 x e4m3), cropped to the valid
        # sizes: padding is zeros, and cropping keeps the sums the unpadded layer's.
        w13, w2 = dequantize_layer(*_expert(arrays, e), gated=gated,
                                   layout="trtllm" if trtllm else "linear")
        w13, w2 = w13[0], w2[0]
        if gated:
            up, gate = w13[:ip, :h][:i], w13[ip:, :h][:i]
        else:
            up, gate = w13[:i, :h], None
        return up, gate, w2[:h, :i]

    def expert_out(e):
        up_w, gate_w, w2 = weights(e)
        up = _dot(xq, up_w)
        if quantize:
            if gated:  # silu(gate * a1 s_gate) * up * a1 s_up / a2: in units of 1/a2
                act = (jax.nn.silu(_dot(xq, gate_w) * scalars["output1_scale_gate_scalar"][e])
                       * (up * scalars["output1_scale_scalar"][e]))
            else:      # relu(up * a1 s)^2 / a2
                act = (jnp.square(jax.nn.relu(up * scalars["output1_scale_gate_scalar"][e]))
                       * scalars["output1_scale_scalar"][e])
            # Quantized again for GEMM2 with global scale 1 (the 1/a2 is already in).
            act = dequantize_nvfp4(*quantize_nvfp4(act, 1.0), 1.0)
            return _dot(act, w2) * scalars["output2_scale_scalar"][e]
        s13 = scalars["w13_weight_scale_2"]
        s_gate, s_up = (s13[e, 0], s13[e, -1]) if s13.ndim == 2 else (s13[e], s13[e])
        if gated:
            act = jax.nn.silu(_dot(xq, gate_w) * s_gate) * (up * s_up)
        else:
            act = jnp.square(jax.nn.relu(up * s_up))
        return _dot(act, w2) * scalars["w2_weight_scale_2"][e]

    def body(e, out):
        return lax.cond(routed[e],
                        lambda: out + combine[:, e, None] * expert_out(e),
                        lambda: out)

    return lax.fori_loop(0, e_total, body, jnp.zeros((t, h), jnp.float32))


def moe_forward(x, layer, topk_ids, topk_weights, *, activation: str = "swiglu",
                quantize_activations: bool = False):
    """A reference forward of one NVFP4 MoE layer, from either layout, on any platform.

    For each token ``t`` and its routed experts ``e = topk_ids[t, j]``::

        out[t] = sum_j topk_weights[t, j] * W2_e @ act(W13_e @ x[t])

    with ``W = e2m1 x e4m3 block scale x weight_scale_2`` (gate and up rows of w13
    each with their own ``weight_scale_2``), ``act`` ``silu(gate) * up`` (swiglu,
    w13 rows ``[up (w3); gate (w1)]``) or ``relu(up)**2`` (relu2, w13 = up only).
    float32 throughout (``Precision.HIGHEST``, float32 accumulation).

    Parameters
    ----------
    x : float array ``[T, H]``
        The tokens' hidden states (bf16/fp16/fp32), ``H`` the model's hidden size.
        A prepared layer padded to ``Hp > H`` is used with ``x`` as is (its padding
        is zeros); the output has ``H`` columns.
    layer : mapping
        As :func:`jax_nvfp4.load` returns one MoE layer: ``w13_weight``,
        ``w13_weight_scale``, ``w2_weight``, ``w2_weight_scale`` (as
        :func:`prepare_layer` takes them, or as it returns them), and the float32
        scalars ``w13_weight_scale_2`` (``[E, 2]`` columns gate, up, or ``[E]``; not
        gated ``[E]`` or ``[E, 1]``) and ``w2_weight_scale_2`` ``[E]``. With
        ``quantize_activations=True`` instead the kernel's scalars
        ``output1_scale_scalar``, ``output1_scale_gate_scalar``,
        ``output2_scale_scalar`` ``[E]`` and ``hidden_states_global_scale`` ``[]``
        (:func:`kernel_scales`). A :class:`PreparedLayer` (or a mapping of arrays
        that came out of ``prepare``) is read in the TRT-LLM layout, its padding
        cropped to ``.hidden_size``/``.intermediate_size`` where it records them;
        any other mapping in the checkpoint layout. Other keys are ignored. Under
        ``jax.jit`` only the ``PreparedLayer`` type tells the layouts apart (the
        arrays' marks do not survive tracing): wrap :func:`prepare_layer`'s arrays in
        a ``PreparedLayer``.
    topk_ids : int array ``[T, k]``
        The experts of each token, in ``[0, E)`` (checked when concrete; under jit
        an id out of range selects nothing).
    topk_weights : float array ``[T, k]``
        Their combine weights (as the router gives them: nothing is renormalized).
    activation : {"swiglu", "relu2"}, keyword-only
        Must match the layer: swiglu needs a gated w13 (``2 I`` rows), relu2 a
        non-gated one (``I`` rows).
    quantize_activations : bool, keyword-only
        False: the float forward above. True: the kernel's arithmetic, with its
        scalars: ``x`` quantized to NVFP4 with ``hidden_states_global_scale``
        (:func:`quantize_nvfp4`); GEMM1 on the e2m1 x block-scale values, its gate
        half scaled by ``output1_scale_gate_scalar`` and its up half by
        ``output1_scale_scalar`` (not gated: ``relu(acc * gate scalar)**2 *
        output1_scale_scalar``), so the activation comes out in units of the GEMM2
        input scale; that activation quantized to NVFP4 again with global scale 1;
        GEMM2 scaled by ``output2_scale_scalar``. It agrees with the float forward
        within FP4 tolerances when the kernel scalars are right: the check that they are.

    Returns
    -------
    float32 ``[T, H]``

    Jittable (``activation`` and ``quantize_activations`` static); peak memory one
    expert's float32 weights plus ``O(T x (H + I))``. From a prepared layer and from
    the checkpoint layer the results are the same bit for bit (the dequantized
    values are identical and the padding is cropped before any sum) when the
    prepared layer records its sizes; without them (``None``) padded ``I`` enters
    the sums as zeros (equal in exact arithmetic, possibly not bit for bit).

    Raises
    ------
    TypeError, ValueError
        A layer missing keys (named), arrays of the wrong shapes or dtypes, ``x`` or
        the routing not matching the layer, an ``activation`` the layer's w13 does not
        fit, expert ids out of range.
    """
    cfg = _validate(x, layer, topk_ids, topk_weights, activation, quantize_activations)
    arrays = tuple(layer[n] for n in NAMES)
    names = KERNEL_SCALARS if quantize_activations else CHECKPOINT_SCALARS
    scalars = {n: jnp.asarray(layer[n], jnp.float32) for n in names}
    if quantize_activations:
        scalars["hidden_states_global_scale"] = scalars["hidden_states_global_scale"].reshape(())
    return _forward(x, arrays, scalars, jnp.asarray(topk_ids), jnp.asarray(topk_weights),
                    **cfg)
