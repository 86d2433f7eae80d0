"""flashinfer kernels called from JAX through XLA FFI (jax-tvm-ffi): no torch at call time.

Public API
----------
trtllm_fp4_moe(x, layer, topk_ids, topk_weights, *, ...)
    flashinfer's fused NVFP4 MoE (``trtllm_fp4_block_scale_moe``, TensorRT-LLM's
    kernel) on a prepared layer, inside ``jit``; activations quantized in JAX.
    Blackwell (sm_100 / sm_103) only; unverified on hardware (see its docstring).
block_scale_interleave(scales, *, out=None, start=0)
    flashinfer's 128x4 scale swizzle as one FFI call on XLA's stream, in place into a
    donated ``out``.
missing()
    Why the FFI route cannot run in this process (None when it can).
"""

from ._ffi import missing
from ._interleave import block_scale_interleave
from ._moe import trtllm_fp4_moe

__all__ = ["block_scale_interleave", "missing", "trtllm_fp4_moe"]
