"""Hand-written GPU kernels of the fast paths, each with a plain PyTorch fallback it is tested against."""
