"""Pure PyTorch building blocks (adapters, quantization, backbones, LM blocks); no Lightning imports."""
