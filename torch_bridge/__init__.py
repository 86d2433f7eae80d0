"""torch_bridge: JAX buffers handed to torch / flashinfer through DLPack, zero-copy."""
