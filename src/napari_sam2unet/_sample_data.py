"""Sample data: a small real abdominal MRI and its label map (TotalSegmentator, Apache-2.0).

See sample_data/README.md for the attribution.
"""

from __future__ import annotations

from pathlib import Path

from ._reader import read_nifti

SAMPLE_DIR = Path(__file__).parent / "sample_data"
SAMPLE_IMAGE = SAMPLE_DIR / "example_mr_sm.nii.gz"
SAMPLE_LABELS = SAMPLE_DIR / "example_seg_mr.nii.gz"
# The liver's value in the sample label map.
SAMPLE_LIVER = 5


def sample_paths() -> tuple[Path, Path]:
    """(image, label map) paths of the bundled sample MRI, for the CLI and scripts."""
    return SAMPLE_IMAGE, SAMPLE_LABELS


def sample_mri() -> list:
    """npe2 sample data hook: the MRI as an image layer and its label map as a labels layer."""
    image, labels = read_nifti([str(SAMPLE_IMAGE), str(SAMPLE_LABELS)])
    labels[1]["name"] = "example_mr_sm reference labels"
    labels[1]["opacity"] = 0.4
    return [image, labels]
