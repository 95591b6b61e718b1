"""SAM2-UNet's adapter: a small bottleneck MLP whose output is added before each Hiera block.

With the trunk frozen, only these (and the decoder) are trained.
"""

from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """x -> block(x + GELU(W2 GELU(W1 x))); the names match the official `prompt_learn`."""

    def __init__(self, block: nn.Module, hidden: int):
        super().__init__()
        self.block = block
        dim = block.attn.qkv.in_features
        self.prompt_learn = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.GELU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x + self.prompt_learn(x))
