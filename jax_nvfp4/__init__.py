"""jax-nvfp4: NVFP4 MoE weights in the TensorRT-LLM / flashinfer layout, prepared in JAX, in place.

Public API
----------
prepare(params, *, gated, donate, backend, hidden_alignment, keys, w13_order, ...)
    Every MoE layer of a params pytree (dicts, nnx states, dataclasses, ...), to the layout
    of flashinfer's ``trtllm_fp4_block_scale_moe``.
prepare_layer / unprepare_layer
    One layer's four arrays, to the layout (padded) and back (cropped).
PreparedLayer, is_prepared, PrepareError
    The mark of a prepared layer (with its valid sizes); a failure that keeps earlier layers.
fuse_gate_up, tp_interleave
    Separate gate/up halves into w13; a checkpoint's w13 reordered for tensor parallelism.
load(path, *, prepare, sharding, layers)
    A ModelOpt NVFP4 checkpoint (or a prepared one) as JAX params, with the kernel's scalars.
kernel_scales
    The kernel's per-expert scalars and activation global scale from the checkpoint's scales.
quantize_nvfp4, moe_forward
    The kernel's activation quantizer; a reference MoE forward from either layout.
dequantize_layer
    One layer's float values, from either layout.
kernels
    flashinfer's kernels as XLA FFI calls (``block_scale_interleave``, ``trtllm_fp4_moe``).
"""

from . import kernels
from .numerics.dequant import dequantize_layer
from .numerics.forward import moe_forward
from .checkpoint.load import load
from .layer import prepare_layer, unprepare_layer
from .numerics.quant import quantize_nvfp4
from .numerics.scales import kernel_scales
from .tree.prepare import PrepareError, PreparedLayer, fuse_gate_up, is_prepared, prepare
from .tree.tp import tp_interleave
from .version import __version__

__all__ = [
    "PrepareError",
    "PreparedLayer",
    "dequantize_layer",
    "fuse_gate_up",
    "is_prepared",
    "kernels",
    "kernel_scales",
    "load",
    "moe_forward",
    "prepare",
    "prepare_layer",
    "quantize_nvfp4",
    "tp_interleave",
    "unprepare_layer",
]
