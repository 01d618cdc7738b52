"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3).

    h = W0 x + (alpha / r) * B A x

A frozen weight W0 gets a trainable low-rank update. B starts at zero so an adapter is a no-op at
init: adding one to a trained model changes nothing until it is trained. The update can be merged
into W0 (`delta_weight`) so a tuned model runs at the base model's speed.
"""
import math

import torch
from torch import nn


class LoRA(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, r: int = 8, alpha: float | None = None):
        super().__init__()
        self.scale = (alpha if alpha is not None else r) / r
        # A gets Kaiming-like init, B zeros: the product starts at exactly zero
        self.A = nn.Parameter(torch.randn(dim_in, r) / math.sqrt(dim_in))
        self.B = nn.Parameter(torch.zeros(r, dim_out))

    def delta_weight(self) -> torch.Tensor:
        """The update in nn.Linear's layout, (dim_out, dim_in), ready to add to a base weight."""
        return (self.A @ self.B).t() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A @ self.B) * self.scale
