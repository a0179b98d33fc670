"""InfVSR streaming video super-resolution: a pure-PyTorch core."""
