"""jax-nvfp4: NVFP4 MoE weights in the TensorRT-LLM / flashinfer layout, prepared in JAX, in place.

Public API
----------
prepare(params, *, gated, donate, backend)
    Every MoE layer of a params pytree, to the layout of flashinfer's
    ``trtllm_fp4_block_scale_moe``.
prepare_layer / unprepare_layer
    One layer's four arrays, to the layout and back.
PreparedLayer, is_prepared
    The mark of a prepared layer.
load(path, *, prepare, sharding, layers)
    A ModelOpt NVFP4 checkpoint (or a prepared one) as JAX params, streamed layer by layer.
dequantize_layer
    One layer's float values, from either layout.
"""

from . import kernels
from ._dequant import dequantize_layer
from ._forward import moe_forward
from ._load import load
from ._prepare import prepare_layer, unprepare_layer
from ._quant import quantize_nvfp4
from ._scales import kernel_scales
from ._tree import PrepareError, PreparedLayer, fuse_gate_up, is_prepared, prepare
from ._tp import tp_interleave

__version__ = "0.1.0"

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
