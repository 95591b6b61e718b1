"""Model cards: the YAML beside each .onnx that says how to feed the model and what it is.

A card is the one place for a model's input spec, normalisation, crop mode and threshold;
the engine and backends read it and never repeat those facts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelError

MODELS_ENV = "SAM2UNET_MODELS"
# The bundled model the CLI and the widget use when none is named.
DEFAULT_MODEL = "sam2unet-compact"

# The official SAM2-UNet preprocessing: /255 then ImageNet mean and std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNEL_MODES = ("replicate", "multiview")
CROP_MODES = ("square", "box_aspect")
LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class InputSpec:
    """How a slice becomes the model's input tensor."""

    shape: tuple[int, int, int, int] = (1, 3, 352, 352)  # batch may be -1 (dynamic)
    layout: str = "nchw"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: str = "replicate"  # replicate: one window x3; multiview: three intensity views
    crop: str = "square"  # square: square crop around the box; box_aspect: the box's own shape
    margin: float = 0.15  # crop margin on each side, as a fraction of the box side
    name: str | None = None  # ONNX input name; None: the first input

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        if self.layout == "nhwc":
            return self.shape[1], self.shape[2]
        return self.shape[2], self.shape[3]

    @property
    def dynamic_batch(self) -> bool:
        return self.shape[0] in (-1, 0)


@dataclass(frozen=True)
class NpuBinary:
    """A QNN context binary of the same model, for the AidLite backend."""

    file: Path
    soc: str = ""
    qnn_version: str = ""
    framework: str = "TYPE_QNN"  # AidLite FrameworkType name, e.g. TYPE_QNN or TYPE_QNN231
    layout: str = "nhwc"
    input_dtype: str = "float32"  # float32 | uint8 | int8 | uint16 | int16
    # Quantised I/O in QNN's convention: real = (q + offset) * scale (offset = -zero_point).
    input_scale: float = 1.0
    input_offset: float = 0.0
    output_dtype: str = "float32"
    output_scale: float = 1.0
    output_offset: float = 0.0
    sha256: str | None = None


@dataclass
class ModelCard:
    """A model file with the facts needed to run it and to judge it."""

    name: str
    file: Path
    input: InputSpec = field(default_factory=InputSpec)
    output_shape: tuple[int, int, int, int] = (1, 1, 352, 352)
    threshold: float = 0.5
    # Average the logits of the slice and its three flips (4x the model's work, steadier edges).
    flip_average: bool = False
    sha256: str | None = None
    card_path: Path | None = None
    npu: list[NpuBinary] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Identifies the model's weights, for caches: the hash when known, else the path."""
        return self.sha256 or str(self.file)

    def verify(self) -> None:
        """Check that the model file exists and matches the card's sha256."""
        if not self.file.is_file():
            raise ModelError(
                f"model file {self.file} is missing; reinstall the package or point "
                f"--model at an existing .onnx"
            )
        if self.sha256:
            actual = sha256_file(self.file)
            if actual != self.sha256:
                raise ModelError(
                    f"model file {self.file.name} is corrupt or was replaced: sha256 {actual[:12]}... "
                    f"but its card says {self.sha256[:12]}...; re-export it or restore the original"
                )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tuple(value: Any, length: int, what: str, path: Path) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ModelError(f"model card {path}: '{what}' must be a list of {length} numbers")
    return tuple(value)


def _choice(value: str, allowed: tuple[str, ...], what: str, path: Path) -> str:
    if value not in allowed:
        raise ModelError(f"model card {path}: '{what}' is {value!r}; use one of {allowed}")
    return value


def card_from_dict(data: dict[str, Any], card_path: Path) -> ModelCard:
    """Build a ModelCard from parsed YAML; file paths are relative to the card."""
    if not isinstance(data, dict) or "file" not in data:
        raise ModelError(f"model card {card_path} has no 'file' entry naming the .onnx model")
    base = card_path.parent
    spec = data.get("input", {}) or {}
    defaults = InputSpec()
    input_spec = InputSpec(
        shape=_tuple(spec.get("shape", defaults.shape), 4, "input.shape", card_path),
        layout=_choice(spec.get("layout", defaults.layout), LAYOUTS, "input.layout", card_path),
        scale=float(spec.get("scale", defaults.scale)),
        mean=_tuple(spec.get("mean", defaults.mean), 3, "input.mean", card_path),
        std=_tuple(spec.get("std", defaults.std), 3, "input.std", card_path),
        channels=_choice(
            spec.get("channels", defaults.channels), CHANNEL_MODES, "input.channels", card_path
        ),
        crop=_choice(spec.get("crop", defaults.crop), CROP_MODES, "input.crop", card_path),
        margin=float(spec.get("margin", defaults.margin)),
        name=spec.get("name"),
    )
    output = data.get("output", {}) or {}
    npu = [
        NpuBinary(**{**entry, "file": base / entry["file"]})
        for entry in data.get("npu", []) or []
    ]
    return ModelCard(
        name=str(data.get("name", card_path.stem)),
        file=base / data["file"],
        input=input_spec,
        output_shape=_tuple(output.get("shape", (1, 1, 352, 352)), 4, "output.shape", card_path),
        threshold=float(data.get("threshold", 0.5)),
        flip_average=bool(data.get("flip_average", False)),
        sha256=data.get("sha256"),
        card_path=card_path,
        npu=npu,
        raw=data,
    )


def load_card(path: str | os.PathLike) -> ModelCard:
    """Read a model card (.yaml), or make the official-defaults card for a bare .onnx."""
    path = Path(path)
    if path.suffix == ".onnx":
        card_path = path.with_suffix(".yaml")
        if not card_path.is_file():
            if not path.is_file():
                raise ModelError(f"model file {path} does not exist")
            # A bare ONNX file: assume the official SAM2-UNet preprocessing.
            return ModelCard(name=path.stem, file=path, card_path=None)
        path = card_path
    if not path.is_file():
        raise ModelError(f"model card {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ModelError(f"model card {path} is not valid YAML: {error}") from None
    return card_from_dict(data, path)


def write_card(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a model card; the caller supplies the dict (file, sha256, input, ...)."""
    path = Path(path)
    card_from_dict(data, path)  # refuse to write a card we could not read back
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bundled_models_dir() -> Path:
    """models/ inside the installed package, or at the repository root in a source checkout."""
    packaged = Path(__file__).parent / "models"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "models"


def search_dirs() -> list[Path]:
    """Where models are found by name: $SAM2UNET_MODELS first, then the bundled models."""
    dirs = []
    if os.environ.get(MODELS_ENV):
        dirs.append(Path(os.environ[MODELS_ENV]).expanduser())
    dirs.append(bundled_models_dir())
    return dirs


def list_models() -> list[ModelCard]:
    """Every model card in the search folders (first one wins for a repeated name)."""
    cards: dict[str, ModelCard] = {}
    for folder in search_dirs():
        if not folder.is_dir():
            continue
        for card_path in sorted(folder.glob("*.yaml")):
            try:
                card = load_card(card_path)
            except ModelError:
                continue
            cards.setdefault(card.name, card)
    return list(cards.values())


def find_model(name_or_path: str | os.PathLike | None = None, verify: bool = True) -> ModelCard:
    """A model by name (from the search folders) or by path to a .onnx or .yaml file."""
    target = name_or_path or DEFAULT_MODEL
    as_path = Path(target).expanduser()
    if as_path.suffix in (".onnx", ".yaml", ".yml") or as_path.exists():
        card = load_card(as_path)
    else:
        matches = [card for card in list_models() if card.name == str(target)]
        if not matches:
            known = ", ".join(card.name for card in list_models()) or "none"
            where = ", ".join(str(d) for d in search_dirs())
            raise ModelError(
                f"no model named {target!r} (known: {known}; searched {where}); "
                f"pass a path to a .onnx file or set {MODELS_ENV} to a folder of models"
            )
        card = matches[0]
    if verify:
        card.verify()
    return card
