"""torch_bridge: JAX buffers handed to torch / flashinfer through DLPack, zero-copy.

Public API
----------
to_torch(x)
    A JAX array as a torch tensor sharing its memory (float8 as uint8 bytes).
from_torch(t, *, copy=False)
    A torch tensor as a JAX array sharing its memory.
block_scale_interleave(scales, *, out=None, start=0)
    flashinfer's 128x4 scale swizzle on JAX arrays: eager, writing into a
    JAX-owned ``out``, or inside ``jit`` on XLA's stream, in place when donated.

torch and flashinfer are imported when a function needs them, not at import.
Inside ``jit``, ``jax_nvfp4.kernels.block_scale_interleave`` calls the same kernel as an
XLA FFI target (jax-tvm-ffi), without torch or a host callback at call time; the
flashinfer backend uses that route when jax-tvm-ffi is installed, this one otherwise.
"""

from ._bridge import PREALLOCATION_HINT, block_scale_interleave, from_torch, to_torch

__all__ = ["PREALLOCATION_HINT", "block_scale_interleave", "from_torch", "to_torch"]
