"""Values: the kernel's scales, the NVFP4 quantizer, dequantization, a reference MoE forward."""
