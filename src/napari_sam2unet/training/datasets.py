"""Training and evaluation data from any folder a user has: case folders, MSD / nnU-Net, manifests.

A *case* is one image with one or more label maps on its grid, a patient (cases of one patient
stay in one split), a modality and a licence. Three layouts are read:

- a case folder: `image.nii.gz` + `label.nii.gz` (+ optional `case.json` with `labels` names,
  `modality`, `patient`, `licence`), or a folder of such folders;
- the Medical Segmentation Decathlon / nnU-Net layout: `dataset.json`, `imagesTr/`, `labelsTr/`;
- a manifest (`.yaml` / `.json`): a list of cases with paths relative to its `root`
  (`${SAM2UNET_DATA}` is expanded) or to the manifest's folder, each with a `split`.

Only paths and metadata are read here; voxels are loaded by `sources.load_case`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import InputError

DATA_ENV = "SAM2UNET_DATA"
SPLITS = ("train", "validation", "test")
CASE_FILES = ("image.nii.gz", "label.nii.gz")


def add_data_root_argument(parser) -> None:
    """--data-root on a command that reads manifests (default: $SAM2UNET_DATA)."""
    parser.add_argument("--data-root", default=os.environ.get(DATA_ENV),
                        help=f"the folder a manifest's paths are relative to (default: ${DATA_ENV})")


@dataclass(frozen=True)
class LabelSpec:
    """A label map and which of its values are targets.

    ids None: every non-zero value. union: the listed ids (or all) as one structure (for example
    a whole tumour). above: a mask image, voxels > above are the structure (a brain-extracted scan).
    """

    file: Path
    ids: tuple[int, ...] | None = None
    union: bool = False
    above: float | None = None
    name: str = ""


@dataclass(frozen=True)
class TrainingCase:
    name: str
    image: Path
    labels: tuple[LabelSpec, ...]
    patient: str
    split: str = "train"
    modality: str = "auto"  # auto | mr | ct
    licence: str = ""
    source: str = ""
    weight: float = 1.0
    label_names: dict[int, str] = field(default_factory=dict, hash=False, compare=False)

    def files(self) -> list[Path]:
        return [self.image, *(label.file for label in self.labels)]


def find_cases(paths, split: str = "train", root: str | os.PathLike | None = None) -> list[TrainingCase]:
    """Every case under the given paths. Cases from manifests keep their own split."""
    cases: list[TrainingCase] = []
    for path in paths:
        cases += _cases_at(Path(path), split, root)
    if not cases:
        raise InputError(f"no training cases found in {', '.join(map(str, paths))}; see docs/training.md")
    return cases


def _cases_at(path: Path, split: str, root) -> list[TrainingCase]:
    if path.is_file() and path.suffix in (".yaml", ".yml", ".json") and path.name != "dataset.json":
        return read_training_manifest(path, root)
    if path.is_file() and path.name == "dataset.json":
        return read_msd(path.parent, split)
    if not path.is_dir():
        raise InputError(f"{path} does not exist; give a case folder, a dataset folder or a manifest")
    if (path / "dataset.json").is_file():
        return read_msd(path, split)
    if all((path / name).exists() for name in CASE_FILES) or (path / CASE_FILES[0]).exists():
        return [read_case_folder(path, split)]
    found = [read_case_folder(sub, split) for sub in sorted(path.iterdir())
             if sub.is_dir() and (sub / CASE_FILES[0]).exists()]
    if not found:
        raise InputError(
            f"{path} holds no case folders (image.nii.gz + label.nii.gz) and no dataset.json; "
            "see docs/training.md for the layouts"
        )
    return found


def read_case_folder(folder: Path, split: str) -> TrainingCase:
    image, label = folder / CASE_FILES[0], folder / CASE_FILES[1]
    if not label.is_file():
        raise InputError(f"{folder}: {CASE_FILES[1]} is missing; every case needs a label map beside its image")
    meta = {}
    if (folder / "case.json").is_file():
        meta = _read_json(folder / "case.json")
    names = {int(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    return TrainingCase(
        name=folder.name, image=image, labels=(LabelSpec(label),), patient=str(meta.get("patient", folder.name)),
        split=str(meta.get("split", split)), modality=str(meta.get("modality", "auto")).lower(),
        licence=str(meta.get("licence", "")), source=str(meta.get("source", "")), label_names=names,
    )


def read_msd(folder: Path, split: str) -> list[TrainingCase]:
    """A Decathlon (`training` list) or nnU-Net v2 (`file_ending`, `_0000` channels) dataset."""
    info = _read_json(folder / "dataset.json")
    modality = _msd_modality(info)
    names = _msd_label_names(info)
    licence = str(info.get("licence", info.get("license", "")))
    pairs = []
    if isinstance(info.get("training"), list):
        for entry in info["training"]:
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise InputError(f"{folder / 'dataset.json'}: each 'training' entry needs 'image' and 'label'")
            pairs.append((folder / entry["image"], folder / entry["label"]))
    else:
        ending = info.get("file_ending", ".nii.gz")
        for label in sorted((folder / "labelsTr").glob(f"*{ending}")):
            case = label.name[: -len(ending)]
            pairs.append((folder / "imagesTr" / f"{case}_0000{ending}", label))
    cases = []
    for image, label in pairs:
        for path in (image, label):
            if not path.is_file():
                raise InputError(f"{folder / 'dataset.json'} lists {path}, which does not exist")
        case = image.name.split(".")[0].removesuffix("_0000")
        cases.append(TrainingCase(name=f"{folder.name}/{case}", image=image, labels=(LabelSpec(label),),
                              patient=f"{folder.name}/{case}", split=split, modality=modality,
                              licence=licence, source=str(info.get("name", folder.name)), label_names=names))
    if not cases:
        raise InputError(f"{folder / 'dataset.json'} lists no training cases")
    return cases


def _msd_modality(info: dict) -> str:
    channels = info.get("modality") or info.get("channel_names") or {}
    first = str(next(iter(channels.values()), "")).lower() if isinstance(channels, dict) else ""
    return "ct" if first == "ct" else ("mr" if first else "auto")


def _msd_label_names(info: dict) -> dict[int, str]:
    labels = info.get("labels") or {}
    out = {}
    for key, value in labels.items():
        # Decathlon: {"1": "liver"}; nnU-Net v2: {"liver": 1}.
        if str(key).isdigit():
            out[int(key)] = str(value)
        elif isinstance(value, int):
            out[value] = str(key)
    return {k: v for k, v in out.items() if k != 0}


def read_training_manifest(path: Path, root=None) -> list[TrainingCase]:
    """A list of cases (see the module docstring); `split` per case, paths under `root`."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as error:  # RecursionError: nested too deep
        raise InputError(f"{path} cannot be read as a data manifest ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise InputError(f"{path}: a data manifest needs a 'cases' list")
    base = _manifest_root(path, data, root)
    cases = []
    for index, entry in enumerate(data["cases"]):
        what = f"{path} case {index + 1}"
        if not isinstance(entry, dict) or "image" not in entry or "labels" not in entry:
            raise InputError(f"{what}: each case needs 'image' and 'labels'")
        split = entry.get("split", "train")
        if split not in SPLITS:
            raise InputError(f"{what}: split {split!r} is not one of {', '.join(SPLITS)}")
        labels = tuple(_label_spec(base, item, what) for item in entry["labels"])
        name = str(entry.get("name", Path(entry["image"]).parent.name or entry["image"]))
        cases.append(TrainingCase(
            name=name, image=base / entry["image"], labels=labels, patient=str(entry.get("patient", name)),
            split=split, modality=str(entry.get("modality", "auto")).lower(), licence=str(entry.get("licence", "")),
            source=str(entry.get("source", "")), weight=float(entry.get("weight", 1.0)),
            label_names={int(k): str(v) for k, v in (entry.get("names") or {}).items()},
        ))
    return cases


def _manifest_root(path: Path, data: dict, root) -> Path:
    if root is not None:
        return Path(root)
    text = str(data.get("root", "."))
    if f"${{{DATA_ENV}}}" in text or f"${DATA_ENV}" in text:
        if not os.environ.get(DATA_ENV):
            raise InputError(
                f"{path} reads its scans from ${DATA_ENV}: set {DATA_ENV} to the data folder "
                f"(for this project, shared/data beside the repository) or pass --data-root"
            )
    expanded = Path(os.path.expandvars(text))
    return expanded if expanded.is_absolute() else path.parent / expanded


def _label_spec(base: Path, item, what: str) -> LabelSpec:
    if isinstance(item, str):
        return LabelSpec(base / item)
    if not isinstance(item, dict) or "file" not in item:
        raise InputError(f"{what}: a label entry is a path or a mapping with 'file'")
    ids = item.get("ids")
    return LabelSpec(base / item["file"], tuple(int(i) for i in ids) if ids is not None else None,
                     bool(item.get("union", False)), item.get("above"), str(item.get("name", "")))


def check_splits(cases: list[TrainingCase]) -> None:
    """Stop when a patient appears in two splits: validation would measure memory, not skill."""
    seen: dict[str, tuple[str, str]] = {}
    for case in cases:
        if case.patient in seen and seen[case.patient][0] != case.split:
            split, other = seen[case.patient]
            raise InputError(
                f"patient {case.patient!r} is in two splits: {other} ({split}) and {case.name} ({case.split}); "
                f"keep a patient's cases in one split"
            )
        seen.setdefault(case.patient, (case.split, case.name))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise InputError(f"{path} is not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data


def default_manifest() -> Path:
    """The bundled model's data: the recipe's manifest shipped with the package."""
    return Path(__file__).with_name("bundled_data.yaml")
