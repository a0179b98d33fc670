import torch

# CI and developer machines have 2 cores: keep the tests from oversubscribing them.
torch.set_num_threads(2)
