"""Weights on disk: the trained-weights directory (manifest, heads, LoRA adapter) and downloads."""
