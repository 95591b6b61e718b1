"""A plain convolutional U-Net of about the compact SAM2-UNet's size: the comparison model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.decoder import DoubleConv
from ..modeling.sam2unet import to_work_size


def _block(cin: int, cout: int) -> nn.Sequential:
    """The SAM2-UNet decoder's (3x3 conv, BN, ReLU) twice, as a bare Sequential (its weights' names)."""
    return DoubleConv(cin, cout, cout).double_conv


class PlainUNet(nn.Module):
    """Strided stem (like the SAM2-UNet patch embedding), four encoder levels, U-Net decoder.

    forward returns (out, out, out) so it trains with the same three-output loss code; only
    the first map is the prediction.
    """

    def __init__(self, widths=(48, 96, 192, 384), stem_stride: int = 4, work_size: int | None = 192):
        super().__init__()
        self.work_size = work_size
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, stride=stem_stride, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.enc = nn.ModuleList()
        cin = widths[0]
        for w in widths:
            self.enc.append(_block(cin, w))
            cin = w
        self.dec = nn.ModuleList()
        for w_skip, w in zip(reversed(widths[:-1]), reversed(widths[1:])):
            self.dec.append(_block(w + w_skip, w_skip))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x):
        size = x.shape[-2:]
        y = self.stem(to_work_size(x, self.work_size))
        skips = []
        for i, block in enumerate(self.enc):
            if i:
                y = F.max_pool2d(y, 2)
            y = block(y)
            skips.append(y)
        y = skips.pop()
        for block in self.dec:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], 1))
        out = F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)
        return out, out, out
