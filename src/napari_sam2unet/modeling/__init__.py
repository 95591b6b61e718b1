"""PyTorch SAM2-UNet (needs the [export] extra): trunk, adapters, decoder, configurations."""

from .configs import CONFIGS, Sam2UnetConfig, get_config
from .sam2unet import Sam2Unet, build_sam2unet, count_parameters

__all__ = [
    "CONFIGS",
    "Sam2Unet",
    "Sam2UnetConfig",
    "build_sam2unet",
    "count_parameters",
    "get_config",
]
