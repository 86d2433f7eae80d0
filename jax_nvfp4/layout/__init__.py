"""The layout as pure index math: LayerSpec, the index moves, one layer's steps, and the numpy reference."""
