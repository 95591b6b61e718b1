"""The assembled SAM2-UNet: Hiera trunk with adapters, RFBs, U-Net decoder, three heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import Sam2UnetConfig, get_config
from .decoder import RFB, Up
from .hiera import Hiera


class Sam2Unet(nn.Module):
    """out, out1, out2 = model(x): three N x 1 x H x W logit maps; `out` is the prediction.

    Attribute names (encoder, rfb1..4, up1..4, side1, side2, head) match the official
    state dict, so official checkpoints load strictly.
    """

    def __init__(self, config: Sam2UnetConfig):
        super().__init__()
        self.config = config
        self.encoder = Hiera(config)
        width = config.rfb_channels
        for index, dim in enumerate(config.stage_dims, start=1):
            setattr(self, f"rfb{index}", RFB(dim, width))
        self.up1 = Up(2 * width, width)
        self.up2 = Up(2 * width, width)
        self.up3 = Up(2 * width, width)
        if config.unused_up4:
            # Present in the official weights, never called in forward.
            self.up4 = Up(2 * width, width)
        self.side1 = nn.Conv2d(width, 1, 1)
        self.side2 = nn.Conv2d(width, 1, 1)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        x = to_work_size(x, self.config.work_size)
        f1, f2, f3, f4 = self.encoder(x)
        f1, f2, f3, f4 = self.rfb1(f1), self.rfb2(f2), self.rfb3(f3), self.rfb4(f4)
        # Heads upsample straight to the input size: the official fixed factors (16, 8, 4)
        # give the same sizes and sampling whenever the input is a multiple of 32.
        y = self.up1(f4, f3)
        out1 = F.interpolate(self.side1(y), size=size, mode="bilinear", align_corners=False)
        y = self.up2(y, f2)
        out2 = F.interpolate(self.side2(y), size=size, mode="bilinear", align_corners=False)
        y = self.up3(y, f1)
        out = F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)
        return out, out1, out2


def to_work_size(x: torch.Tensor, work_size: int | None) -> torch.Tensor:
    """Resize an N x C x H x W batch to work_size (antialiased when shrinking); no-op when unset."""
    if not work_size or tuple(x.shape[-2:]) == (work_size, work_size):
        return x
    shrink = x.shape[-1] > work_size
    return F.interpolate(x, size=(work_size, work_size), mode="bilinear", align_corners=False, antialias=shrink)


def build_sam2unet(config: str | Sam2UnetConfig = "large") -> Sam2Unet:
    """A randomly initialised SAM2-UNet for a config name (see CONFIGS) or config object."""
    return Sam2Unet(get_config(config))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
