"""Segment MRI and CT volumes with SAM2-UNet, steered by points and boxes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-sam2unet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
