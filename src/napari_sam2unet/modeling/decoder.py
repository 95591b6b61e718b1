"""SAM2-UNet's decoder: RFB modules on the four trunk features, a U-Net path and three heads.

Kept faithful to the official weights, quirks included: BasicConv2d never applies a ReLU,
the U-Net upsampling uses align_corners=True and the heads' final upsampling does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
    """Convolution + batch norm, no activation (the official one has a ReLU it never uses)."""

    def __init__(self, cin: int, cout: int, kernel, padding=0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _branch(cin: int, cout: int, size: int) -> nn.Sequential:
    """1x1 reduce, 1xk and kx1 convolutions, then a 3x3 with dilation k: a receptive field of ~k."""
    half = size // 2
    return nn.Sequential(
        BasicConv2d(cin, cout, 1),
        BasicConv2d(cout, cout, (1, size), padding=(0, half)),
        BasicConv2d(cout, cout, (size, 1), padding=(half, 0)),
        BasicConv2d(cout, cout, 3, padding=size, dilation=size),
    )


class RFB(nn.Module):
    """Receptive field block: four branches of growing context, fused, plus a residual 1x1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(cin, cout, 1))
        self.branch1 = _branch(cin, cout, 3)
        self.branch2 = _branch(cin, cout, 5)
        self.branch3 = _branch(cin, cout, 7)
        self.conv_cat = BasicConv2d(4 * cout, cout, 3, padding=1)
        self.conv_res = BasicConv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)]
        fused = self.conv_cat(torch.cat(branches, dim=1))
        return F.relu(fused + self.conv_res(x))


class DoubleConv(nn.Module):
    """(3x3 conv, BN, ReLU) twice; indices match the official `double_conv` Sequential."""

    def __init__(self, cin: int, cout: int, mid: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """Upsample the coarse map onto the skip's grid, concatenate [skip, coarse], DoubleConv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = DoubleConv(cin, cout, cin // 2)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Resizing straight to the skip's size equals the official x2 upsample + pad when
        # the grids halve exactly (align_corners=True maps corners to corners either way),
        # and also handles odd grids (e.g. 11 -> 5 in stride-8 configs).
        coarse = F.interpolate(coarse, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, coarse], dim=1))
