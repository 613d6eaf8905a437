"""Weight quantization: round-to-nearest, AWQ, weight-only linears and quantized checkpoints."""
