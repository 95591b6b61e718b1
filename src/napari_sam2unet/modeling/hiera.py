"""Hiera, SAM2's hierarchical image encoder (the "trunk"), in plain torch.

Module and parameter names follow SAM2 so official weights load by name. Tokens are kept
channels-last (B, H, W, C) between blocks, as in SAM2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter
from .configs import Sam2UnetConfig


def pad_to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad the bottom and right of a (B, H, W, C) map to whole windows."""
    height, width = x.shape[1], x.shape[2]
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * nH * nW, window, window, C)."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)


def from_windows(windows: torch.Tensor, window: int, padded: tuple[int, int]) -> torch.Tensor:
    """Inverse of to_windows for a padded grid of size `padded`."""
    height, width = padded
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def pool_tokens(x: torch.Tensor, pool: nn.Module | None) -> torch.Tensor:
    """Apply a 2D pooling to a channels-last map."""
    if pool is None:
        return x
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Strided convolution from pixels to channels-last tokens."""

    def __init__(self, dim: int, kernel: int, stride: int, padding: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """Two linear layers with a GELU between (SAM2's MLP with num_layers=2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](F.gelu(self.layers[0](x)))


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries may be pooled (halving the grid)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None):
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)
        if self.q_pool is not None:
            q = pool_tokens(q.reshape(batch, height, width, -1), self.q_pool)
            height, width = q.shape[1], q.shape[2]
            q = q.reshape(batch, height * width, self.num_heads, -1)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x.transpose(1, 2).reshape(batch, height, width, -1)
        return self.proj(x)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block; at a stage change it widens and (maybe) pools the grid."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        q_stride: int | None,
    ):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        pool = nn.MaxPool2d(q_stride, stride=q_stride) if q_stride else None
        self.pool = pool
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = pool_tokens(self.proj(x), self.pool)
        out_h, out_w = shortcut.shape[1], shortcut.shape[2]
        window = self.window_size
        if window > 0:
            x = to_windows(pad_to_windows(x, window), window)
        x = self.attn(x)
        if window > 0:
            # Pooled queries shrink each window by the stride; SAM2 keeps the same window
            # count, so the padded output grid is the pooled window times that count.
            if self.q_stride:
                window = window // self.q_stride
            padded = (-(-out_h // window) * window, -(-out_w // window) * window)
            x = from_windows(x, window, padded)[:, :out_h, :out_w]
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Hiera(nn.Module):
    """The SAM2 trunk with an adapter around each block (SAM2-UNet's encoder).

    Returns the four stage outputs as NCHW maps, finest first.
    """

    def __init__(self, config: Sam2UnetConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(
            config.embed_dim, config.patch_kernel, config.patch_stride, config.patch_padding
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, config.embed_dim, *config.pos_embed_size))
        window0 = config.window_spec[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, config.embed_dim, window0, window0))
        ends = [sum(config.stages[: i + 1]) - 1 for i in range(len(config.stages))]
        self.stage_ends = ends
        q_pool_blocks = [end + 1 for end in ends[:-1]][: config.q_pool]

        blocks = []
        dim, heads, stage = config.embed_dim, config.num_heads, 0
        for index in range(config.depth):
            # SAM2's lag: a stage's first block still uses the previous stage's window.
            window = config.window_spec[stage]
            if index in config.global_att_blocks:
                window = 0
            dim_out = dim
            if index - 1 in ends:
                dim_out, heads, stage = dim * 2, heads * 2, stage + 1
            block = MultiScaleBlock(
                dim,
                dim_out,
                heads,
                config.mlp_ratio,
                window,
                q_stride=2 if index in q_pool_blocks else None,
            )
            blocks.append(Adapter(block, config.adapter_dim))
            dim = dim_out
        self.blocks = nn.ModuleList(blocks)
        self._fixed_pos_embed: torch.Tensor | None = None

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Background embedding resized to the grid plus the tiled window embedding (BHWC)."""
        if self._fixed_pos_embed is not None:
            return self._fixed_pos_embed
        pos = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")
        window = self.pos_embed_window
        reps = (height // window.shape[2], width // window.shape[3])
        pos = pos + window.tile(1, 1, *reps)
        return pos.permute(0, 2, 3, 1)

    def fix_position_embedding(self, height: int, width: int) -> None:
        """Precompute the embedding for one input grid, so an export sees a constant."""
        with torch.no_grad():
            self._fixed_pos_embed = None
            self._fixed_pos_embed = self.position_embedding(height, width).detach().clone()

    def release_position_embedding(self) -> None:
        self._fixed_pos_embed = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.stage_ends:
                features.append(x.permute(0, 3, 1, 2))
        return features
