"""Label names and colours beside a NIfTI label map, in the files ITK-SNAP and 3D Slicer read.

- ``<stem>-labels.txt``: an ITK-SNAP label description file (Segmentation > Import Label
  Descriptions): ``IDX R G B A VIS MSH "NAME"``, A from 0 to 1.
- ``<stem>.ctbl``: a 3D Slicer colour table (load it with the label map; Segment Editor and
  the Colors module read it): ``VALUE NAME R G B A``, A from 0 to 255, names without spaces.
Both are read back by :func:`read_label_table`, which the napari reader uses.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

from .paths import nifti_stem

Table = dict[int, tuple[str, tuple[int, int, int]]]  # label -> (name, (r, g, b) 0..255)


def itksnap_path(nifti: Path) -> Path:
    return nifti.with_name(nifti_stem(nifti) + "-labels.txt")


def slicer_path(nifti: Path) -> Path:
    return nifti.with_name(nifti_stem(nifti) + ".ctbl")


def write_itksnap(path: Path, table: Table) -> Path:
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format: ",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields: IDX label value, R G B colour 0-255, A opacity 0-1, VIS/MSH visible 0/1, LABEL name",
        "################################################",
        f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8g} {0:2d} {0:2d}    "Clear Label"',
    ]
    for label, (name, (r, g, b)) in sorted(table.items()):
        safe = name.replace('"', "'")
        lines.append(f'{label:5d} {r:5d} {g:4d} {b:4d} {1:8g} {1:2d} {1:2d}    "{safe}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def write_slicer(path: Path, table: Table) -> Path:
    lines = [f"# Color table file {path.name}", f"# {len(table) + 1} values", "0 Background 0 0 0 0"]
    for label, (name, (r, g, b)) in sorted(table.items()):
        lines.append(f"{label} {slicer_name(name)} {r} {g} {b} 255")
    path.write_text("\n".join(lines) + "\n")
    return path


def slicer_name(name: str) -> str:
    """Slicer's colour table splits on whitespace: spaces become underscores."""
    return re.sub(r"\s+", "_", name.strip()) or "unnamed"


def read_itksnap(path: Path) -> Table:
    """ITK-SNAP's `IDX R G B A VIS MSH "LABEL"` lines (a quoted name keeps its spaces)."""
    return _read_table(Path(path), shlex.split, "a label line needs 8 fields (IDX R G B A VIS MSH LABEL)", 8, 7, 1)


def read_slicer(path: Path) -> Table:
    """Slicer's `VALUE NAME R G B A` lines."""
    return _read_table(Path(path), str.split, "a colour line needs VALUE NAME R G B A", 6, 1, 2)


def _read_table(path: Path, split: Callable[[str], list[str]], layout: str, count: int, name: int, rgb: int) -> Table:
    """Label -> (fields[name], fields[rgb:rgb + 3]) of each line; blank lines, comments and label 0 passed over."""
    table: Table = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = split(line)
        if len(fields) < count:
            raise ValueError(f"{path.name}: {layout}: {line!r}")
        label = int(fields[0])
        if label:
            red, green, blue = (int(value) for value in fields[rgb:rgb + 3])
            table[label] = (fields[name], (red, green, blue))
    return table


def write_label_tables(nifti: Path, table: Table) -> list[Path]:
    """Both files beside the label map; returns their paths."""
    return [write_itksnap(itksnap_path(nifti), table), write_slicer(slicer_path(nifti), table)]


def read_label_table(nifti: Path) -> Table:
    """Names and colours found beside a label map (ITK-SNAP file first: it keeps spaces), or {}."""
    nifti = Path(nifti)
    if itksnap_path(nifti).is_file():
        return read_itksnap(itksnap_path(nifti))
    if slicer_path(nifti).is_file():
        return read_slicer(slicer_path(nifti))
    return {}


def name_features(names: dict[int, str]):
    """A napari Labels layer's features table naming each label (shown on hover)."""
    import pandas as pd

    labels = sorted(int(k) for k in names)
    return pd.DataFrame({"index": labels, "name": [str(names[k]) for k in labels]})
