"""Helpers shared by the PyTorch parity tests."""

import torch


def randomize_batchnorm(
    model: torch.nn.Module, seed: int, scale: float = 0.2
) -> None:
  """Random affine parameters and running statistics for every BatchNorm2d
  (so that eval-mode BatchNorm is not the identity in a comparison)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + scale * torch.randn(n, generator=g))
        m.bias.copy_(scale * torch.randn(n, generator=g))
        m.running_mean.copy_(scale * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
