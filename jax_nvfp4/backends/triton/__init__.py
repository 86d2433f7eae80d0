"""backend="triton": the whole layer as Triton kernels (program, tiles, kernels)."""
