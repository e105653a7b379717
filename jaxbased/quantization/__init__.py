"""Post-training quantization: static 8-bit Mamba (Quamba), docs/quantization.md."""
