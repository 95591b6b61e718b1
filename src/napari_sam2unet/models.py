"""Model cards: the YAML beside each .onnx that says how to feed the model and what it is.

A card is the one place for a model's input spec, normalisation, crop mode and threshold;
the engine and backends read it and never repeat those facts.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
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
# prompted: channel 0 the window, channels 1-2 a prior mask and clicks (prompt_maps.py)
CHANNEL_MODES = ("replicate", "multiview", "prompted")
CROP_MODES = ("square", "box_aspect")
LAYOUTS = ("nchw", "nhwc")
# The SAM2-UNet contract and the card defaults, here only: InputSpec and ModelCard take them as
# defaults and card_fields writes them into the cards this package makes.
INPUT_SIZE = 352  # input height and width
MARGIN = 0.15  # crop margin on each side of the box, as a fraction of its side
THRESHOLD = 0.5  # probability above which a pixel is in the mask


@dataclass(frozen=True)
class InputSpec:
    """How a slice becomes the model's input tensor."""

    shape: tuple[int, int, int, int] = (1, 3, INPUT_SIZE, INPUT_SIZE)  # batch may be -1 (dynamic)
    layout: str = "nchw"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: str = "replicate"  # replicate: one window x3; multiview: three views; prompted: window + prompts
    crop: str = "square"  # square: square crop around the box; box_aspect: the box's own shape
    margin: float = MARGIN
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
    output_shape: tuple[int, int, int, int] = (1, 1, INPUT_SIZE, INPUT_SIZE)
    threshold: float = THRESHOLD
    # Average the logits of the slice and its three flips (4x the model's work, steadier edges).
    flip_average: bool = False
    # How strongly a prompted model sees the neighbour's mask when propagating: the prior channel
    # holds that mask times this (0..1). A model that copies its prior too faithfully follows
    # the image more with less (the bundled card's choice is measured in docs/performance.md).
    propagation_prior: float = 1.0
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
        verify_file(self.file, self.sha256, "model file",
                    "reinstall the package or point --model at an existing .onnx",
                    "re-export it or restore the original")


def verify_file(path: Path, sha256: str | None, what: str, if_missing: str, if_changed: str) -> None:
    """A file a card names must exist and, when the card has its sha256, match it (one line each)."""
    if not path.is_file():
        raise ModelError(f"{what} {path} is missing; {if_missing}")
    if sha256:
        actual = sha256_file(path)
        if actual != sha256:
            raise ModelError(f"{what} {path.name} is corrupt or was replaced: sha256 {actual[:12]}... "
                             f"but the card says {sha256[:12]}...; {if_changed}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelCardWarning(UserWarning):
    """A model card that was skipped (discovery goes on without it)."""


_SHA256 = re.compile(r"[0-9a-f]{64}")
_NPU_FIELDS = {f.name for f in fields(NpuBinary)}


def _number(value: Any, what: str, path: Path, low: float | None = None, high: float | None = None,
            inclusive: bool = False) -> float:
    """A finite number, optionally inside (low, high) or [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelError(f"model card {path}: '{what}' is {value!r}; it must be a number")
    inside = ((low is None or (value >= low if inclusive else value > low))
              and (high is None or (value <= high if inclusive else value < high)))
    if not inside:
        if high is None:
            span = f"{'>=' if inclusive else '>'} {low:g}"
        else:
            span = f"[{low:g}, {high:g}]" if inclusive else f"({low:g}, {high:g})"
        raise ModelError(f"model card {path}: '{what}' is {value!r}; it must be {span}")
    return float(value)


def _tuple(value: Any, length: int, what: str, path: Path, positive: bool = False) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ModelError(f"model card {path}: '{what}' must be a list of {length} numbers")
    return tuple(_number(v, what, path, 0 if positive else None) for v in value)


def _shape(value: Any, what: str, path: Path, channels: int, layout: str) -> tuple[int, int, int, int]:
    """N x C x H x W (or N x H x W x C): whole numbers, the batch may be -1 or 0 (dynamic)."""
    shape = _tuple(value, 4, what, path)
    if not all(float(d).is_integer() for d in shape):
        raise ModelError(f"model card {path}: '{what}' is {list(value)}; dimensions must be whole numbers")
    shape = tuple(int(d) for d in shape)
    rest = shape[1:]
    c, h, w = (rest[2], rest[0], rest[1]) if layout == "nhwc" else rest
    if shape[0] < -1 or h < 1 or w < 1 or c != channels:
        expected = f"NxHxWx{channels}" if layout == "nhwc" else f"Nx{channels}xHxW"
        raise ModelError(f"model card {path}: '{what}' is {list(shape)}; expected {expected} with H, W >= 1 "
                         f"(batch -1 for dynamic)")
    return shape


def _choice(value: str, allowed: tuple[str, ...], what: str, path: Path) -> str:
    if value not in allowed:
        raise ModelError(f"model card {path}: '{what}' is {value!r}; use one of {allowed}")
    return value


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelError(f"model card {path}: '{what}' is {value!r}; it must be a mapping of fields (key: value)")
    return value


def _sha256(value: Any, what: str, path: Path) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value.lower()):
        raise ModelError(f"model card {path}: '{what}' is {value!r}; it must be 64 hex digits "
                         f"(sha256sum of the file), or leave it out")
    return value.lower()


def _input_spec(spec: dict[str, Any], path: Path) -> InputSpec:
    defaults = InputSpec()
    layout = _choice(spec.get("layout", defaults.layout), LAYOUTS, "input.layout", path)
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise ModelError(f"model card {path}: 'input.name' is {name!r}; it must be the ONNX input's name")
    return InputSpec(
        shape=_shape(spec.get("shape", defaults.shape), "input.shape", path, 3, layout),
        layout=layout,
        scale=_number(spec.get("scale", defaults.scale), "input.scale", path, 0),
        mean=_tuple(spec.get("mean", defaults.mean), 3, "input.mean", path),
        std=_tuple(spec.get("std", defaults.std), 3, "input.std", path, positive=True),
        channels=_choice(spec.get("channels", defaults.channels), CHANNEL_MODES, "input.channels", path),
        crop=_choice(spec.get("crop", defaults.crop), CROP_MODES, "input.crop", path),
        margin=_number(spec.get("margin", defaults.margin), "input.margin", path, 0, 10, inclusive=True),
        name=name,
    )


def _npu_binary(entry: Any, base: Path, path: Path) -> NpuBinary:
    entry = _mapping(entry, "npu entry", path)
    if not isinstance(entry.get("file"), str):
        raise ModelError(f"model card {path}: an npu entry has no 'file' naming its QNN context binary (.bin)")
    unknown = sorted(set(entry) - _NPU_FIELDS)
    if unknown:
        raise ModelError(f"model card {path}: npu entry {entry['file']} has unknown fields {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_NPU_FIELDS))}")
    for key in ("input_scale", "input_offset", "output_scale", "output_offset"):
        if key in entry:
            _number(entry[key], f"npu.{key}", path)
    sha = _sha256(entry.get("sha256"), "npu.sha256", path)
    return NpuBinary(**{**entry, "file": base / entry["file"], "sha256": sha})


def card_from_dict(data: dict[str, Any], card_path: Path) -> ModelCard:
    """Build a ModelCard from parsed YAML; file paths are relative to the card. Every field is checked."""
    if not isinstance(data, dict) or not isinstance(data.get("file"), str):
        raise ModelError(f"model card {card_path} has no 'file' entry naming the .onnx model")
    base = card_path.parent
    input_spec = _input_spec(_mapping(data.get("input"), "input", card_path), card_path)
    output = _mapping(data.get("output"), "output", card_path)
    npu = data.get("npu") or []
    if not isinstance(npu, list):
        raise ModelError(f"model card {card_path}: 'npu' must be a list of binaries (- file: model.bin ...)")
    flip = data.get("flip_average", False)
    if not isinstance(flip, bool):
        raise ModelError(f"model card {card_path}: 'flip_average' is {flip!r}; use true or false")
    return ModelCard(
        name=str(data.get("name", card_path.stem)),
        file=base / data["file"],
        input=input_spec,
        output_shape=_shape(output.get("shape", ModelCard.output_shape), "output.shape", card_path, 1, "nchw"),
        threshold=_number(data.get("threshold", ModelCard.threshold), "threshold", card_path, 0, 1),
        flip_average=flip,
        propagation_prior=_number(data.get("propagation_prior", 1.0), "propagation_prior", card_path, 0, 1,
                                  inclusive=True),
        sha256=_sha256(data.get("sha256"), "sha256", card_path),
        card_path=card_path,
        npu=[_npu_binary(entry, base, card_path) for entry in npu],
        raw=data,
    )


_CARD_SUFFIXES = (".yaml", ".yml")
MAX_CARD_BYTES = 1 << 20  # a card is a few kB; a larger one is not a card (and not read whole)


class _CardLoader(yaml.SafeLoader):
    """safe_load without aliases: `*name` can expand a few lines into gigabytes (an alias bomb)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a model card", mark)
        return super().compose_node(parent, index)


class _CardDumper(yaml.SafeDumper):
    """safe_dump that writes a repeated value out again instead of as an alias the loader refuses."""

    def ignore_aliases(self, data):
        return True


def _read_card_yaml(path: Path) -> Any:
    """The card's YAML, read only up to MAX_CARD_BYTES and without aliases."""
    with open(path, "rb") as file:
        raw = file.read(MAX_CARD_BYTES + 1)
    if len(raw) > MAX_CARD_BYTES:
        raise ModelError(f"model card {path} is over {MAX_CARD_BYTES >> 20} MiB: not a model card")
    return yaml.load(raw.decode("utf-8"), Loader=_CardLoader)


def load_card(path: str | os.PathLike) -> ModelCard:
    """Read a model card (.yaml), or make the official-defaults card for a bare .onnx."""
    path = Path(path)
    if path.suffix.lower() not in (".onnx", *_CARD_SUFFIXES):
        raise ModelError(f"{path.name} is not a model: give a .onnx file, its .yaml card, or a model name "
                         f"(`sam2unet models` lists them)")
    if path.suffix.lower() == ".onnx":  # x.ONNX too: its card is x.yaml
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
        data = _read_card_yaml(path)
    except yaml.YAMLError as error:
        raise ModelError(f"model card {path} is not valid YAML: {_one_line(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"cannot read model card {path}: {_one_line(error)}") from None
    return card_from_dict(data, path)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def card_fields(onnx_path: Path, spec: InputSpec = InputSpec(), name: str | None = None,
                output_name: str | None = None) -> dict[str, Any]:
    """The fields every card this package writes starts with: name, file, sha256, every input
    field (the official preprocessing unless `spec` says otherwise), the output (one NCHW map of
    the input's size, whatever the layout) and the threshold. Writers add the rest."""
    height, width = spec.size
    inputs = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(spec).items()}
    output = {"name": output_name, "shape": [spec.shape[0], 1, height, width]}
    return {
        "name": name or onnx_path.stem,
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "input": {key: value for key, value in inputs.items() if value is not None},
        "output": {key: value for key, value in output.items() if value is not None},
        "threshold": THRESHOLD,
    }


def write_card(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a model card; the caller supplies the dict (file, sha256, input, ...)."""
    path = Path(path)
    card_from_dict(data, path)  # refuse to write a card we could not read back
    path.write_text(yaml.dump(data, Dumper=_CardDumper, sort_keys=False))
    return path


def bundled_models_dir() -> Path:
    """models/ inside the installed package, or at the repository root in a source checkout."""
    packaged = Path(__file__).parent / "models"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "models"


def user_models_dir() -> Path:
    """The per-user models folder ($XDG_DATA_HOME/napari-sam2unet/models): fine-tuned models go
    here when $SAM2UNET_MODELS is not set, and it is always searched, so they are found later."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share").expanduser()
    return base / "napari-sam2unet" / "models"


def models_folder() -> Path:
    """Where new models are written by default: $SAM2UNET_MODELS when set, else the user's folder."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]).expanduser()
    return user_models_dir()


def search_dirs() -> list[Path]:
    """Where models are found by name: $SAM2UNET_MODELS, the per-user folder, the bundled models."""
    dirs = []
    if os.environ.get(MODELS_ENV):
        dirs.append(Path(os.environ[MODELS_ENV]).expanduser())
    dirs += [user_models_dir(), bundled_models_dir()]
    return dirs


def list_models() -> list[ModelCard]:
    """Every model card in the search folders (first one wins for a repeated name)."""
    cards: dict[str, ModelCard] = {}
    for folder in search_dirs():
        if not folder.is_dir():
            continue
        for card_path in sorted(p for p in folder.iterdir() if p.suffix.lower() in _CARD_SUFFIXES):
            try:
                card = load_card(card_path)
            except ModelError as error:  # one bad card must not hide the others
                warnings.warn(f"skipped: {error}", ModelCardWarning, stacklevel=2)
                continue
            first = cards.setdefault(card.name, card)
            if first is card or first.card_path is None:
                continue
            if first.card_path.parent == folder:
                warnings.warn(f"two cards in {folder} name the model {card.name!r}: using {first.card_path.name}, "
                              f"skipped {card_path.name}; rename one (its `name:`)", ModelCardWarning, stacklevel=2)
            elif (first.card_path, card_path) not in _SHADOWED_SAID:  # said once a process, not on every lookup
                _SHADOWED_SAID.add((first.card_path, card_path))
                warnings.warn(f"two folders have a model named {card.name!r}: using {first.card_path} (its folder is "
                              f"searched first), not {card_path}; to use that one give its path as the model",
                              ModelCardWarning, stacklevel=2)
    return list(cards.values())


# (card used, card hidden) pairs already warned about: a name found in two search folders.
_SHADOWED_SAID: set[tuple[Path, Path]] = set()


def find_model(name_or_path: str | os.PathLike | None = None, verify: bool = True) -> ModelCard:
    """A model by name (from the search folders) or by path to a .onnx or .yaml file."""
    target = name_or_path or DEFAULT_MODEL
    as_path = Path(target).expanduser()
    if as_path.suffix.lower() in (".onnx", *_CARD_SUFFIXES) or as_path.exists():
        card = load_card(as_path)
    else:
        cards = list_models()
        matches = [card for card in cards if card.name == str(target)]
        if not matches:
            known = ", ".join(card.name for card in cards) or "none"
            where = ", ".join(str(d) for d in search_dirs())
            raise ModelError(
                f"no model named {target!r} (known: {known}; searched {where}); "
                f"pass a path to a .onnx file or set {MODELS_ENV} to a folder of models"
            )
        card = matches[0]
    if verify:
        card.verify()
    return card
