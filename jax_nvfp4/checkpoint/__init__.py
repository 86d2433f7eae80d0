"""ModelOpt NVFP4 safetensors checkpoints: read, load, convert, inspect (and convert's lock)."""
