"""flashinfer's fused NVFP4 MoE (``trtllm_fp4_block_scale_moe``) from JAX, through XLA FFI.

The launcher is flashinfer's TVM-FFI function ``trtllm_fp4_block_scale_moe``
(``csrc/trtllm_fused_moe_kernel_launcher.cu``, flashinfer 0.7.4: 46 positional
arguments, tensors and optionals interleaved with scalars). jax-tvm-ffi hands an FFI
call's operands, results and attributes to a function in blocks, so a small Python
adaptor (``_adaptor``) puts them in the launcher's order, with ``None`` for the unused
optionals, exactly as flashinfer's ``trtllm_fp4_block_scale_routed_moe`` does for
pre-computed routing (``(topk_ids, topk_weights)``, routing mode ``UnpackedPrecomputed``).
It runs under the GIL on XLA's thread, with XLA's stream set as TVM-FFI's stream; no torch.

Memory: the output and the launcher's ``workspace_buffer`` are results of the FFI call
(XLA buffers); a third result is jax-tvm-ffi's allocation pool, from which any tensor the
launcher still allocates is carved (``use_last_output_for_alloc_workspace``), so nothing
is allocated behind XLA's back.

Hardware: the kernels are trtllm-gen's, Blackwell only (sm_100 / sm_103). Unverified on
hardware: written and checked on CPU against a stand-in with the launcher's calling
convention (tests/test_kernels_moe.py), never run on a Blackwell GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi

TARGET = "jax_nvfp4.trtllm_fp4_block_scale_moe"
SUPPORTED_CC = ((10, 0), (10, 3))
WRITTEN_FOR = "0.7.4"  # the flashinfer whose launcher signature _adaptor follows

ACTIVATIONS = {"swiglu": 3, "relu2": 6}  # flashinfer ActivationType.Swiglu / .Relu2
UNPACKED_PRECOMPUTED = 2  # flashinfer RoutingInputMode.UnpackedPrecomputed
NVFP4_4OVER6_FROM_ENV = -1  # flashinfer's default (NVFP4_4OVER6_CODE_FROM_ENV)
ALLOC_POOL_BYTES = 32 << 20  # jax-tvm-ffi's pool for what the launcher allocates itself

ARRAYS = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
SCALARS = ("output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar")
GLOBAL = "hidden_states_global_scale"
ATTRS = ("num_experts", "top_k", "intermediate_size", "local_expert_offset",
         "local_num_experts", "routing_method_type", "enable_pdl", "act_type",
         "valid_hidden_size", "valid_intermediate_size", "use_workspace", "nvfp4_4over6_code")

# Stand-ins for flashinfer's launcher per platform (tests: a recorder on "cpu"), taking
# the launcher's 46 arguments. Set before the first call on that platform.
_STAND_INS: dict[str, object] = {}
_lock = threading.Lock()


def _adaptor(launcher):
    """The FFI call's blocks (operands, results, attributes) in the launcher's order."""
    def call(topk_ids, topk_weights, hidden_states, hidden_states_scale, gemm1_weights,
             gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, output1_scale_scalar,
             output1_scale_gate_scalar, output2_scale_scalar, output, workspace,
             num_experts, top_k, intermediate_size, local_expert_offset, local_num_experts,
             routing_method_type, enable_pdl, act_type, valid_hidden_size,
             valid_intermediate_size, use_workspace, nvfp4_4over6_code):
        launcher(
            UNPACKED_PRECOMPUTED,   # routing_input_mode
            None,                   # routing_logits
            topk_ids,               # int32 [T, K], global expert ids
            topk_weights,           # float32 or bfloat16 [T, K]
            None,                   # routing_bias
            hidden_states,          # uint8 [T, Hp/2], packed e2m1
            hidden_states_scale,    # float8_e4m3fn [T, Hp/16], linear layout
            gemm1_weights, gemm1_weights_scale,
            None, None, None, None, None,  # gemm1_bias, lora_delta, alpha, beta, clamp_limit
            gemm2_weights, gemm2_weights_scale,
            None,                   # gemm2_bias
            output1_scale_scalar, output1_scale_gate_scalar, output2_scale_scalar,
            None,                   # per_token_scales
            int(num_experts), int(top_k),
            0,                      # num_fused_shared_experts
            None, None,             # n_group, topk_group (no grouped routing)
            int(intermediate_size), int(local_expert_offset), int(local_num_experts),
            None,                   # routed_scaling_factor
            int(routing_method_type),
            True,                   # do_finalize: the routed, weighted sum [T, H]
            bool(enable_pdl), int(act_type),
            output,                 # bfloat16 [T, valid H]
            [-1, -1],               # config_index: the launcher's default tactic
            True,                   # norm_topk_prob (unused with pre-computed routing)
            None,                   # routing_replay_out
            [], [], False,          # no distribution-aware routing metadata / body
            None if valid_hidden_size < 0 else int(valid_hidden_size),
            None if valid_intermediate_size < 0 else int(valid_intermediate_size),
            workspace if use_workspace else None,
            False,                  # query_workspace_size
            int(nvfp4_4over6_code),
        )
    return call


def missing() -> str | None:
    """Why the fused MoE cannot be called in this process (None when it can, hardware
    aside)."""
    why = _ffi.missing()
    if why:
        return why
    for module, what in (("torch", "torch"), ("flashinfer", "flashinfer-python")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed; {_ffi.INSTALL_HINT}"
    return None


@functools.lru_cache(maxsize=None)
def _flashinfer_launcher(rubin: bool):
    """flashinfer's compiled launcher: its own loader first (it also sets up the cubin
    loader for trtllm-gen's kernels), then the TVM-FFI module's function."""
    from flashinfer.fused_moe import core
    core._get_trtllm_moe_sm100_module_impl(rubin)
    module = core.gen_trtllm_gen_fused_moe_sm100_module(enable_rubin=rubin).build_and_load()
    return module, module.trtllm_fp4_block_scale_moe


def _refuse_device(device) -> None:
    if device.platform in _STAND_INS:
        return
    if device.platform != "gpu":
        raise ValueError(
            f"trtllm_fp4_moe needs a CUDA GPU (Blackwell, sm_100 / sm_103); the arrays are on "
            f"{device.platform}. Use jax_nvfp4.moe_forward (any platform) instead")
    cc = _ffi.compute_capability(device)
    if cc not in SUPPORTED_CC:
        found = "unknown" if cc is None else f"{cc[0]}.{cc[1]} (sm_{cc[0]}{cc[1]})"
        raise RuntimeError(
            f"trtllm_fp4_moe needs a Blackwell GPU of compute capability 10.0 or 10.3 "
            f"(sm_100 / sm_103: trtllm-gen's FP4 MoE kernels exist only there); "
            f"{device.device_kind} has compute capability {found}. Use "
            "jax_nvfp4.moe_forward (the reference forward, any platform) instead")


def _ensure(device) -> None:
    why = missing() if device.platform not in _STAND_INS else _ffi.missing()
    if why:
        raise ImportError(f"trtllm_fp4_moe: {why}")
    _refuse_device(device)
    platform = device.platform
    if _ffi.is_registered(TARGET, platform):
        return
    with _lock:
        if platform in _STAND_INS:
            launcher = _STAND_INS[platform]
        else:
            import flashinfer
            if flashinfer.__version__ != WRITTEN_FOR:
                import warnings
                warnings.warn(
                    f"jax_nvfp4.kernels.trtllm_fp4_moe passes the launcher's arguments of "
                    f"flashinfer {WRITTEN_FOR}; this is flashinfer {flashinfer.__version__} "
                    "(a changed argument list fails in the launcher)", stacklevel=3)
            launcher = _flashinfer_launcher(_ffi.compute_capability(device) == (10, 7))[1]
        _ffi.register(TARGET, _adaptor(launcher),
                      ["args", "rets"] + [f"attrs.{a}" for a in ATTRS], platform,
                      pass_owned_tensor=True, use_last_output_for_alloc_workspace=True)


def _shape(x):
    return tuple(int(d) for d in x.shape)


def _dt(x):
    return np.dtype(x.dtype)


def _int(name, v, low=0):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


def _check(x, layer, topk_ids, topk_weights, activation, num_experts, local_expert_offset):
    """Every argument against the kernel's contract; returns the sizes it needs."""
    from ..tree.prepare import PreparedLayer

    if not isinstance(layer, Mapping):
        raise TypeError(f"layer: expected a PreparedLayer mapping (as jax_nvfp4.load or "
                        f"prepare return), got {type(layer).__name__}")
    if not isinstance(layer, PreparedLayer):
        raise ValueError("layer: the arrays must be in the TRT-LLM layout (a PreparedLayer, "
                         "as jax_nvfp4.prepare or load(prepare=True) return); this is a plain "
                         "mapping: prepare it first")
    absent = [k for k in ARRAYS + SCALARS + (GLOBAL,) if k not in layer]
    if absent:
        raise ValueError(f"layer: missing {', '.join(absent)} (the kernel scalars come from "
                         "jax_nvfp4.kernel_scales; load() adds them)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    gated = activation == "swiglu"
    w13, s13, w2, s2 = (layer[k] for k in ARRAYS)
    for k in ARRAYS:
        if len(layer[k].shape) != 3:
            raise ValueError(f"layer[{k!r}]: expected rank 3, got shape {_shape(layer[k])}")
    for k in ("w13_weight", "w2_weight"):
        if _dt(layer[k]) != np.uint8:
            raise TypeError(f"layer[{k!r}]: expected uint8 (packed e2m1), got {_dt(layer[k])}")
    for k in ("w13_weight_scale", "w2_weight_scale"):
        if _dt(layer[k]) not in (np.dtype(np.uint8), np.dtype(jnp.float8_e4m3fn)):
            raise TypeError(f"layer[{k!r}]: expected float8_e4m3fn (or its uint8 bytes), got "
                            f"{_dt(layer[k])}")
    e, r1, hp2 = _shape(w13)
    hp, ip = 2 * hp2, 2 * _shape(w2)[2]
    want = {"w13_weight_scale": (e, r1, hp // 16), "w2_weight": (e, hp, ip // 2),
            "w2_weight_scale": (e, hp, ip // 16)}
    for k, s in want.items():
        if _shape(layer[k]) != s:
            raise ValueError(f"layer[{k!r}]: expected shape {s} (from w13_weight "
                             f"{_shape(w13)} and w2_weight {_shape(w2)}), got {_shape(layer[k])}")
    if r1 != (2 if gated else 1) * ip:
        raise ValueError(
            f"layer: w13_weight has {r1} rows and w2_weight {ip} columns: activation="
            f"{activation!r} needs {'2 x' if gated else 'as many rows as'} the intermediate size "
            f"({(2 if gated else 1) * ip}); gated layers take 'swiglu', not gated 'relu2'")
    if hp % 256:
        raise ValueError(f"layer: hidden size {hp} is not a multiple of 256; flashinfer's "
                         "NVFP4 kernel gives wrong results otherwise: prepare with "
                         "hidden_alignment=256 (the default)")
    if ip % 128:
        raise ValueError(f"layer: intermediate size {ip} is not a multiple of 128, which the "
                         "kernel's 128-row tiles need")
    for k in SCALARS:
        v = layer[k]
        if _shape(v) != (e,) or _dt(v) != np.float32:
            raise ValueError(f"layer[{k!r}]: expected float32 [{e}], got {_dt(v)} {_shape(v)}")
    g = layer[GLOBAL]
    if _shape(g) not in ((), (1,)) or _dt(g) != np.float32:
        raise ValueError(f"layer[{GLOBAL!r}]: expected a float32 scalar, got {_dt(g)} "
                         f"{_shape(g)}")
    h_valid = layer.hidden_size if layer.hidden_size is not None else hp
    i_valid = layer.intermediate_size if layer.intermediate_size is not None else ip
    if not (0 < h_valid <= hp and 0 < i_valid <= ip):
        raise ValueError(f"layer: valid sizes H={h_valid}, I={i_valid} exceed the arrays' "
                         f"{hp}, {ip}")
    if len(x.shape) != 2 or _shape(x)[1] not in (h_valid, hp):
        raise ValueError(f"x: expected [T, {h_valid}]" + (f" or [T, {hp}]" if hp != h_valid
                         else "") + f" (the layer's hidden size), got shape {_shape(x)}")
    if _dt(x) not in (np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float32)):
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {_dt(x)}")
    t = _shape(x)[0]
    if len(topk_ids.shape) != 2 or _shape(topk_ids)[0] != t or _dt(topk_ids) != np.int32:
        raise ValueError(f"topk_ids: expected int32 [{t}, top_k], got {_dt(topk_ids)} "
                         f"{_shape(topk_ids)}")
    k = _shape(topk_ids)[1]
    if _shape(topk_weights) != (t, k) or _dt(topk_weights) not in (
            np.dtype(np.float32), np.dtype(jnp.bfloat16)):
        raise ValueError(f"topk_weights: expected float32 or bfloat16 [{t}, {k}] (as "
                         f"topk_ids), got {_dt(topk_weights)} {_shape(topk_weights)}")
    offset = _int("local_expert_offset", local_expert_offset)
    n = offset + e if num_experts is None else _int("num_experts", num_experts, 1)
    if offset + e > n:
        raise ValueError(f"num_experts={n} is less than local_expert_offset + local experts "
                         f"= {offset} + {e}")
    if not 0 < k <= n:
        raise ValueError(f"top_k={k} (topk_ids' second axis) must be in 1..num_experts={n}")
    return dict(t=t, k=k, e=e, hp=hp, ip=ip, h_valid=h_valid, i_valid=i_valid, n=n,
                offset=offset)


def trtllm_fp4_moe(x, layer, topk_ids, topk_weights, *, activation: str = "swiglu",
                   num_experts: int | None = None, local_expert_offset: int = 0,
                   routing_method_type: int = 1, enable_pdl: bool = True,
                   workspace_bytes: int | None = None, fast_math: bool = True):
    """flashinfer's fused NVFP4 MoE (TensorRT-LLM's ``trtllm_fp4_block_scale_moe``) from JAX.

    Quantizes ``x`` to NVFP4 in JAX (``jax_nvfp4._quant.quantize_nvfp4`` with the layer's
    ``hidden_states_global_scale``: flashinfer's ``fp4_quantize`` arithmetic, linear scale
    layout), then runs the kernel as one XLA FFI call on XLA's stream (jax-tvm-ffi), with
    pre-computed routing. Jittable; the weights are passed as they lie (no copy).

    **Unverified on hardware**: trtllm-gen's kernels run only on Blackwell (compute
    capability 10.0 / 10.3), which this was not run on. The argument plumbing is tested on
    CPU against a stand-in with the launcher's calling convention; results are unchecked
    until a Blackwell run compares them with ``jax_nvfp4.moe_forward``.

    Parameters
    ----------
    x : bfloat16, float16 or float32 ``[T, H]``
        Activations; ``H`` the layer's valid hidden size (``layer.hidden_size``) or its
        padded one. Zero columns pad it to the prepared size before quantization.
    layer : PreparedLayer
        As :func:`jax_nvfp4.load` or :func:`jax_nvfp4.prepare` return it: ``w13_weight``
        uint8 ``[E, R1, Hp/2]``, ``w13_weight_scale`` float8_e4m3fn ``[E, R1, Hp/16]``,
        ``w2_weight`` uint8 ``[E, Hp, Ip/2]``, ``w2_weight_scale`` ``[E, Hp, Ip/16]`` in the
        TRT-LLM layout, and the kernel scalars of :func:`jax_nvfp4.kernel_scales`
        (``output1_scale_scalar``, ``output1_scale_gate_scalar``, ``output2_scale_scalar``
        float32 ``[E]``, ``hidden_states_global_scale`` float32 ``[]``). ``Hp`` a multiple
        of 256, ``Ip`` of 128; ``R1 = 2 Ip`` (gated) or ``Ip``. ``layer.hidden_size`` /
        ``.intermediate_size``, when smaller, go to the kernel as its valid sizes.
    topk_ids : int32 ``[T, K]``
        Each token's experts, global ids (``local_expert_offset`` .. + E - 1 are this
        layer's; others are skipped, as in expert parallelism).
    topk_weights : float32 or bfloat16 ``[T, K]``
        Their routing weights, passed to the kernel as flashinfer's
        ``trtllm_fp4_block_scale_routed_moe`` passes ``(topk_ids, topk_weights)``.
    activation : {"swiglu", "relu2"}, keyword-only
        Gated SiLU (w13 rows ``[up; gate]`` as prepared) or ReLU^2 (not gated).
    num_experts : int, keyword-only
        Experts of the whole model (default: ``local_expert_offset + E``).
    local_expert_offset : int, keyword-only
        Global id of this layer's first expert.
    routing_method_type : int, keyword-only
        flashinfer's ``RoutingMethodType`` passed with the pre-computed routing (1,
        ``Renormalize``, as vLLM's routed call passes).
    enable_pdl : bool, keyword-only
        Programmatic dependent launch (Blackwell supports it).
    workspace_bytes : int, keyword-only
        Size of the ``workspace_buffer`` (an XLA buffer) the launcher carves its scratch
        from; default: flashinfer's ``trtllm_fused_moe_workspace_size`` for these shapes
        (0: none, the launcher allocates from jax-tvm-ffi's pool).
    fast_math : bool, keyword-only
        Passed to ``quantize_nvfp4`` (True: flashinfer's default fast-math recipe).

    Returns
    -------
    bfloat16 ``[T, H]``
        ``sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])``, ``H`` the valid
        hidden size.

    Raises
    ------
    TypeError, ValueError
        An argument off the contract (named, with what was expected and what came).
    ImportError
        jax-tvm-ffi, flashinfer or torch missing (torch: flashinfer loads its module with it).
    RuntimeError
        A GPU other than Blackwell sm_100 / sm_103 (its compute capability named).
    """
    sizes = _check(x, layer, topk_ids, topk_weights, activation, num_experts,
                   local_expert_offset)
    if isinstance(routing_method_type, bool) or not isinstance(routing_method_type, int):
        raise ValueError(f"routing_method_type must be an int, got {routing_method_type!r}")
    if not isinstance(enable_pdl, bool):
        raise ValueError(f"enable_pdl must be a bool, got {enable_pdl!r}")
    arrays = [layer[k] for k in ARRAYS + SCALARS + (GLOBAL,)] + [x, topk_ids, topk_weights]
    for a in arrays:
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and a.is_deleted():
            raise ValueError("an input array has been deleted (donated to an earlier call)")
    devices = _ffi.devices_of(*arrays) or {_ffi.default_device()}
    for d in devices:
        _ensure(d)
    t, hp, ip = sizes["t"], sizes["hp"], sizes["ip"]
    if workspace_bytes is None:
        workspace_bytes = _workspace_bytes(sizes, activation, devices)
    workspace_bytes = _int("workspace_bytes", workspace_bytes)

    from ..numerics.quant import quantize_nvfp4

    xp = x if x.shape[1] == hp else jnp.pad(x, ((0, 0), (0, hp - x.shape[1])))
    packed, sf = quantize_nvfp4(xp, layer[GLOBAL], fast_math=fast_math)

    def f8(s):
        return s if _dt(s) != np.uint8 else jax.lax.bitcast_convert_type(s, jnp.float8_e4m3fn)

    operands = (topk_ids, topk_weights, packed, f8(sf), layer["w13_weight"],
                f8(layer["w13_weight_scale"]), layer["w2_weight"], f8(layer["w2_weight_scale"]),
                *(layer[k] for k in SCALARS))
    results = (jax.ShapeDtypeStruct((t, sizes["h_valid"]), jnp.bfloat16),
               jax.ShapeDtypeStruct((max(workspace_bytes, 1),), jnp.uint8),
               jax.ShapeDtypeStruct((ALLOC_POOL_BYTES,), jnp.uint8))
    attrs = dict(
        num_experts=np.int64(sizes["n"]), top_k=np.int64(sizes["k"]),
        intermediate_size=np.int64(ip), local_expert_offset=np.int64(sizes["offset"]),
        local_num_experts=np.int64(sizes["e"]), routing_method_type=np.int64(routing_method_type),
        enable_pdl=bool(enable_pdl), act_type=np.int64(ACTIVATIONS[activation]),
        valid_hidden_size=np.int64(sizes["h_valid"] if sizes["h_valid"] != hp else -1),
        valid_intermediate_size=np.int64(sizes["i_valid"] if sizes["i_valid"] != ip else -1),
        use_workspace=bool(workspace_bytes > 0),
        nvfp4_4over6_code=np.int64(NVFP4_4OVER6_FROM_ENV))
    out, _, _ = jax.ffi.ffi_call(TARGET, results, has_side_effect=False)(*operands, **attrs)
    return out


def _workspace_bytes(sizes, activation, devices) -> int:
    """flashinfer's own measure of the launcher's scratch for these shapes (on the GPU)."""
    if any(d.platform in _STAND_INS for d in devices):
        return 0
    from flashinfer.fused_moe import core
    fn = getattr(core, "trtllm_fused_moe_workspace_size", None)
    if fn is None:
        return 0
    import torch
    device = next(iter(devices))
    return int(fn(sizes["t"], sizes["hp"], sizes["ip"], sizes["n"], sizes["k"],
                  quant_mode="nvfp4", local_num_experts=sizes["e"],
                  activation_type=ACTIVATIONS[activation],
                  valid_hidden_size=sizes["h_valid"] if sizes["h_valid"] != sizes["hp"] else None,
                  valid_intermediate_size=(sizes["i_valid"] if sizes["i_valid"] != sizes["ip"]
                                           else None),
                  device=torch.device("cuda", device.local_hardware_id or 0)))
