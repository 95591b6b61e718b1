"""`sam2unet finetune`: a few hundred steps on a user's labelled slices, written as a new model.

The base is any model we can train: an exported SAM2-UNet (weights rebuilt from its ONNX file,
onnx_weights.py), a `sam2unet train` run's best.pt, or an official state dict. Crops are made as
the engine makes them for this model (its card's crop mode, margin and channels, the volume's
own intensity views), from a box around the label outline on each labelled slice, jittered as
people draw boxes. Adapters and decoder train; the trunk is frozen unless asked. BatchNorm keeps
its statistics: a few slices cannot estimate them (and rebuilt models carry them folded). The
ONNX file and its card are written atomically: an interrupted run leaves no model behind.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelError, require_torch
from ..models import DEFAULT_MODEL as DEFAULT_NAME
from ..models import THRESHOLD, InputSpec
from ..terminal import progress_bar
from .datasets import add_data_root_argument

MIN_PIXELS = 4  # a structure smaller than this on a slice gives no training box
MAX_VALIDATION = 48  # held-out slices scored before and after (evenly spread)
TRUNK_CHOICES = ("frozen", "trained")


def _torch():
    return require_torch("fine-tuning", "train")  # one line saying what to install


# --- the base model ----------------------------------------------------------------------------


@dataclass
class Base:
    """A trainable model and what its card says about feeding it."""

    model: object  # Sam2Unet
    config: str
    spec: InputSpec
    size: tuple[int, int]  # the model input (validation crops)
    name: str
    file: Path
    sha256: str
    raw: dict = field(default_factory=dict)  # the base card (empty for checkpoints)
    how: str = ""

    @property
    def train_size(self) -> tuple[int, int]:
        """Training crops: the work size of a model that resizes its input to one (as `train`
        trains the compact models), else the input size. Resampling the crop straight to the
        work size costs a quarter of the 352-px crop and its in-graph resize (loss included)."""
        work = self.model.config.work_size
        return (work, work) if work else self.size


def load_base(base: str | os.PathLike | None = None, config: str | None = None) -> Base:
    """The model to fine-tune: a model name / .onnx / .yaml, a run's best.pt or a state dict."""
    _torch()
    from ..models import find_model, sha256_file

    path = Path(str(base)) if base else None
    if path is not None and path.suffix in (".pt", ".pth"):
        return _base_from_checkpoint(path, config)
    from .onnx_weights import model_from_onnx

    card = find_model(base)
    model, difference = model_from_onnx(card)
    return Base(model, model.config.name, card.input, card.input.size, card.name, card.file,
                card.sha256 or sha256_file(card.file), dict(card.raw),
                f"weights rebuilt from the ONNX initialisers (max logit difference {difference:.1e})")


def _base_from_checkpoint(path: Path, config: str | None) -> Base:
    from ..models import sha256_file
    from .checkpoint_file import load_checkpoint

    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    state = load_checkpoint(path, "--base")  # weights only: a pickle cannot run code
    if "ema" in state and "args" in state:
        from .train import load_run_model

        model, saved = load_run_model(path, "cpu", "--base")
        if saved.get("arch") != "sam2unet":
            raise ModelError(f"{path} is a {saved.get('arch')} run; fine-tuning needs a SAM2-UNet")
        spec = InputSpec(channels=saved["channels"], crop=saved["crop"], margin=saved["margin"])
        return Base(model, saved["config"], spec, spec.size, path.stem, path, sha256_file(path),
                    {"input": {"channels": spec.channels, "crop": spec.crop, "margin": spec.margin}},
                    "a `sam2unet train` run's EMA weights")
    from ..convert.checkpoints import load_sam2unet

    model = load_sam2unet(path, config or "large")
    spec = InputSpec()  # the official preprocessing (convert/export.py's card defaults)
    return Base(model, model.config.name, spec, spec.size, path.stem, path, sha256_file(path), {},
                "an official SAM2-UNet state dict")


# --- the labelled data -------------------------------------------------------------------------


@dataclass
class Item:
    """One structure on one slice: what a box on that slice shows the model."""

    image: np.ndarray  # 2D raw intensities
    mask: np.ndarray  # 2D bool
    spacing: tuple[float, float]
    views: tuple


@dataclass
class Labelled:
    train: list[Item]
    validation: list[Item]
    validation_what: str
    note: dict  # for the card: files, slices, hashes


def volume_data(image: np.ndarray, labels: np.ndarray, spacing, channels: str, axis: int = 2,
                slices=None, label_ids=None, window: str = "auto", what: str = "the label map",
                files=()) -> Labelled:
    """Training items from the labelled slices of one volume.

    slices: train only on these (others that hold labels validate); label_ids: only these ids.
    """
    from ..models import sha256_file
    from ..preprocess import axis_plane, plan_views

    image = np.asarray(image, dtype=np.float32)
    labels, ids, per_slice, train_slices = select_slices(image, labels, axis, slices, label_ids, what)
    held_out = [k for k in sorted(per_slice) if k not in train_slices]
    views = plan_views(image, window, channels)
    spacing2d = tuple(float(s) for a, s in enumerate(spacing) if a != axis)

    def items(ks):
        out = []
        for k in ks:
            plane, lab = axis_plane(image, k, axis), axis_plane(labels, k, axis)
            out += [Item(plane, lab == i, spacing2d, views) for i in per_slice[k]]
        return out

    if len(held_out) > MAX_VALIDATION:
        held_out = [held_out[i] for i in np.linspace(0, len(held_out) - 1, MAX_VALIDATION).round().astype(int)]
    train = items(train_slices)
    digest = hashlib.sha256()
    for item in train:
        digest.update(np.ascontiguousarray(item.image).tobytes())
        digest.update(np.packbits(item.mask).tobytes())
    note = {
        "files": [{"file": str(f), "sha256": sha256_file(Path(f))} for f in files],
        "axis": axis, "slices": train_slices, "labels": ids, "structures": len(train),
        "window": window, "data_sha256": digest.hexdigest(),
    }
    if held_out:
        return Labelled(train, items(held_out), f"{len(held_out)} labelled slices not trained on", note)
    return Labelled(train, train, "the training slices themselves (no other slice is labelled)", note)


def select_slices(image: np.ndarray, labels: np.ndarray, axis: int = 2, slices=None, label_ids=None,
                  what: str = "the label map"):
    """(integer labels, ids, {slice: ids on it}, training slices), or one line saying what is wrong."""
    from .sources import check_pair

    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise InputError(f"{what} is {'x'.join(map(str, labels.shape))} but the image is "
                         f"{'x'.join(map(str, image.shape))}; they must be on the same voxel grid")
    if np.any(labels):
        check_pair(image, labels, what)  # 3D, whole numbers
    labels = labels.astype(np.int64)
    ids = sorted(int(i) for i in np.unique(labels) if i > 0)
    if label_ids:
        ids = [i for i in ids if i in set(label_ids)]
    per_slice = _labelled_slices(labels, ids, axis)
    if not per_slice:
        raise InputError(f"{what} has no labelled slice (no structure of {MIN_PIXELS}+ voxels on any slice of "
                         f"axis {axis}); label the object on a few slices first")
    chosen = sorted(per_slice) if slices is None else sorted(set(slices))
    train_slices = [k for k in chosen if k in per_slice]
    if not train_slices:
        raise InputError(f"none of the slices {chosen} holds a label on axis {axis}; labelled slices: "
                         f"{_ranges(sorted(per_slice))}")
    return labels, ids, per_slice, train_slices


def _labelled_slices(labels: np.ndarray, ids, axis: int) -> dict[int, list[int]]:
    others = tuple(a for a in range(labels.ndim) if a != axis)
    counts = {i: np.count_nonzero(labels == i, axis=others) for i in ids}  # one pass per id
    out: dict[int, list[int]] = {}
    for k in range(labels.shape[axis]):
        present = [i for i in ids if counts[i][k] >= MIN_PIXELS]
        if present:
            out[k] = present
    return out


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:12]) + (" ..." if len(values) > 12 else "")


def read_pair(image: Path, labels: Path, axis: int = 2, slices=None, label_ids=None):
    """An image file and its label map, checked (same grid and affine, labelled slices) before any
    model is loaded: a bad input costs no time."""
    from ..io import read_volume

    volume, label_volume = read_volume(image), read_volume(labels)
    if label_volume.data.shape == volume.data.shape and not np.allclose(label_volume.affine, volume.affine,
                                                                           atol=1e-3):
        raise InputError(f"{labels} is on another grid than {image} (their affines differ); resample the "
                         f"label map onto the image")
    select_slices(volume.data, label_volume.data, axis, slices, label_ids, str(labels))
    return volume, label_volume


def file_data(image: Path, labels: Path, channels: str, axis: int = 2, slices=None, label_ids=None,
              window: str = "auto", pair=None) -> Labelled:
    """volume_data for an image file and its label map file (same voxel grid, same affine)."""
    volume, label_volume = pair or read_pair(image, labels, axis, slices, label_ids)
    return volume_data(volume.data, label_volume.data, volume.spacing, channels, axis, slices, label_ids, window,
                       what=str(labels), files=(image, labels))


def cases_data(paths, channels: str, root=None, axis: int = 2, window: str = "auto") -> Labelled:
    """Every labelled slice of the train cases (datasets.py layouts); validation cases score."""
    from .datasets import find_cases

    return specs_data(find_cases(paths, "train", root), channels, axis, window)


def specs_data(cases, channels: str, axis: int = 2, window: str = "auto") -> Labelled:
    """cases_data for TrainingCase objects (datasets.py): train cases train, validation cases score."""
    from ..io import read_volume
    from ..models import sha256_file
    from .sources import load_layer, split_cases

    splits = split_cases(cases)
    if not splits["train"]:
        raise InputError("no training cases: give --data with cases in the train split")
    parts: dict[str, list[Labelled]] = {"train": [], "validation": []}
    for split in parts:
        for case in splits[split]:
            volume = read_volume(case.image)
            for spec in case.labels:
                layer = load_layer(spec, np.asarray(volume.data), case.name)
                labels = np.isin(layer.labels, layer.ids) * layer.labels
                parts[split].append(volume_data(volume.data, labels, volume.spacing, channels, axis,
                                                window=window, what=f"{case.name}: {spec.file}"))
    train = [i for p in parts["train"] for i in p.train]
    validation = [i for p in parts["validation"] for i in p.train]
    files = sorted({str(f) for c in splits["train"] for f in c.files()})
    note = {"cases": [c.name for c in splits["train"]], "files": [{"file": f, "sha256": sha256_file(Path(f))}
                                                                  for f in files],
            "axis": axis, "structures": len(train), "window": window}
    if validation:
        return Labelled(train, validation, f"the validation cases ({', '.join(c.name for c in splits['validation'])})",
                        note)
    return Labelled(train, train, "the training slices themselves (no validation case)", note)


# --- crops ---------------------------------------------------------------------------------------


def deformed(rng, img: np.ndarray, mask: np.ndarray, degrees: float = 15, scale: float = 0.15):
    """The slice and its mask rotated and rescaled about the structure: the neighbouring slices
    of a structure differ from the labelled ones in outline and size, not only in framing."""
    from scipy import ndimage

    angle = np.deg2rad(rng.uniform(-degrees, degrees))
    zoom = np.exp(rng.uniform(np.log(1 - scale), np.log(1 + scale), 2))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.diag(1 / zoom)  # output -> input coordinates
    centre = np.argwhere(mask).mean(0)
    offset = centre - matrix @ centre
    img = ndimage.affine_transform(img, matrix, offset, order=1, mode="nearest")
    mask = ndimage.affine_transform(mask.astype(np.float32), matrix, offset, order=1) > 0.5
    return img, mask


def training_batch(rng, items: list[Item], spec: InputSpec, size, n: int, deform: float = 0.0,
                   exact: float = 0.0):
    """n crops of random items: box jittered as drawn, framing varied, flips, window jitter,
    (with probability deform) a small rotation and rescaling, and (with probability exact) the
    box and framing the evaluation uses (outline + 10%, the card's margin)."""
    from ..geometry import BOX_GROWTH, enlarged_box, mask_bbox
    from ..preprocess import View
    from ..prompt_maps import is_prompted
    from .data import box_crop_prompts, make_crop

    xs, ys = [], []
    while len(xs) < n:
        item = items[int(rng.integers(len(items)))]
        img, mask, spacing, views = item.image, item.mask, item.spacing, item.views
        if deform and rng.random() < deform:
            img, mask = deformed(rng, img, mask)
            if mask.sum() < MIN_PIXELS:
                continue
        if rng.random() < 0.5:
            img, mask = img[::-1], mask[::-1]
        if rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:  # the window a scan gets varies a little with what is in it
            d = rng.normal(0, 0.04, 2)
            views = tuple(View(v.low + d[0] * (v.high - v.low), v.high + d[1] * (v.high - v.low), v.gamma, v.label)
                          for v in views)
        img, mask = np.ascontiguousarray(img), np.ascontiguousarray(mask)
        if exact and rng.random() < exact:
            box = enlarged_box(*mask_bbox(mask), mask.shape, BOX_GROWTH)
            x, y = make_crop(img, mask, spacing, views, spec, size, box=box)
        else:
            x, y = make_crop(img, mask, spacing, views, spec, size, rng)
        if y.sum() >= 1:
            if is_prompted(spec):  # the same simulated prompts the base model learnt from
                box_crop_prompts(rng, x, y, spec)
            xs.append(x)
            ys.append(y)
    return np.stack(xs).astype(np.float32), np.stack(ys)[:, None].astype(np.float32)


def validation_crops(items: list[Item], spec: InputSpec, size):
    """One fixed crop per item: the outline's box enlarged by 10% (eval's tight protocol)."""
    from ..geometry import BOX_GROWTH, enlarged_box, mask_bbox
    from .data import make_crop

    xs, ys = [], []
    for item in items:
        box = enlarged_box(*mask_bbox(item.mask), item.mask.shape, BOX_GROWTH)
        x, y = make_crop(item.image, item.mask, item.spacing, item.views, spec, size, box=box)
        xs.append(x)
        ys.append(y)
    return np.stack(xs).astype(np.float32), np.stack(ys)[:, None].astype(np.float32)


# --- training --------------------------------------------------------------------------------


@dataclass
class Settings:
    steps: int = 250  # chosen on the tuning set over 150 (docs/finetune.md); ~120 CPU s on one loaded core
    batch: int = 8
    lr: float = 3e-4
    trunk: str = "frozen"
    seed: int = 0
    threads: int = 0  # 0: torch's default
    deform: float = 0.0  # share of training crops rotated and rescaled (deformed())
    exact: float = 0.0  # share of training crops framed as the evaluation frames them

    def check(self) -> None:
        """One line naming a bad value, before any work (--lr inf wrote a model of NaN weights)."""
        from ..options import check_count, check_positive, check_share, check_threads

        check_count("--steps", self.steps)
        check_count("--batch", self.batch)
        check_positive("--lr", self.lr)
        check_share("--deform", self.deform)
        check_share("--exact", self.exact)
        check_threads(self.threads, zero_is_default=True)


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    what: str = "training"


@dataclass
class Result:
    card: Path
    onnx: Path
    dice_before: float
    dice_after: float
    seconds: float


def trainable(model, trunk: str) -> list:
    """Adapters, decoder and prediction head; the trunk too when trunk == 'trained'.

    The side heads are left alone: rebuilt models do not have them, and only `out` predicts.
    """
    if trunk not in TRUNK_CHOICES:
        raise InputError(f"--trunk {trunk!r}: use one of {', '.join(TRUNK_CHOICES)}")
    chosen = []
    for name, p in model.named_parameters():
        use = not name.startswith(("side1.", "side2.", "up4."))
        if name.startswith("encoder.") and trunk == "frozen":
            use = ".prompt_learn." in name
        p.requires_grad_(use)
        if use:
            chosen.append(p)
    return chosen


def iter_finetune(base: Base, data: Labelled, settings: Settings) -> Iterator[Progress]:
    """Train base.model in place, yielding after each step; returns (dice before, after) at the end."""
    torch = _torch()
    from .train import dice_scores, structure_loss

    settings.check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = base.model.eval()  # eval throughout: BatchNorm keeps its statistics
    vx, vy = validation_crops(data.validation, base.spec, base.size)
    yield Progress(0, settings.steps, float("nan"), "validating the base model")
    before = dice_scores(model, vx, vy, "cpu")
    params = trainable(model, settings.trunk)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / settings.steps))))
    for step in range(1, settings.steps + 1):
        x, y = training_batch(rng, data.train, base.spec, base.train_size, settings.batch, settings.deform,
                              settings.exact)
        loss = structure_loss(model(torch.from_numpy(x))[0], torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        yield Progress(step, settings.steps, float(loss.item()))
    yield Progress(settings.steps, settings.steps, float("nan"), "validating the fine-tuned model")
    after = dice_scores(model, vx, vy, "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    return before, after


def card_extra(base: Base, data: Labelled, settings: Settings, before: float, after: float, seconds: float,
               command: str | None) -> dict:
    raw = base.raw
    spec = base.spec
    licence = raw.get("licence", "see the base checkpoint's licence")
    return {
        "input": {"channels": spec.channels, "crop": spec.crop, "margin": spec.margin},
        "threshold": float(raw.get("threshold", THRESHOLD)),
        "flip_average": bool(raw.get("flip_average", False)),
        "licence": f"{licence}; fine-tuned on the data below, whose terms apply too",
        "task": raw.get("task", "box-steered segmentation of one structure per box"),
        "finetune": {
            "base": {"name": base.name, "file": base.file.name, "sha256": base.sha256, "weights": base.how,
                     **({"training": raw["training"]} if "training" in raw else {})},
            **({"command": command} if command else {}),
            "data": data.note,
            "steps": settings.steps, "batch": settings.batch, "lr": settings.lr, "trunk": settings.trunk,
            "deform": settings.deform, "exact": settings.exact, "seed": settings.seed,
            "crop_size": list(base.train_size),
            "seconds": round(seconds, 1),
            "loss": "weighted BCE + weighted IoU on the prediction head; BatchNorm statistics kept",
            "validation": {"what": f"per-crop Dice, box = outline + 10%, on {data.validation_what}",
                           "crops": len(data.validation), "dice_before": round(before, 4),
                           "dice_after": round(after, 4)},
        },
    }


def write_model(base: Base, out: Path, extra: dict, name: str | None, overwrite: bool = False,
                trunk: str = "frozen") -> Path:
    """Write ONNX + card into a temporary folder beside `out`, then move both in (card last):
    discovery reads cards, so a model appears whole or not at all. With a frozen trunk and an
    ONNX base, the new weights go into a copy of the base graph (0.3 CPU s, checked against
    torch); otherwise, or if that check fails, the model is exported again (~28 CPU s)."""
    from ..convert.export import export_onnx

    out = Path(out)
    card_path = out.with_suffix(".yaml")
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".finetune-") as tmp:
        tmp_onnx = Path(tmp) / out.name
        written = trunk == "frozen" and base.file.suffix == ".onnx" and weights_into_graph(base, tmp_onnx)
        if written:
            _write_card(base, tmp_onnx, extra, name or out.stem, written)
        else:
            export_onnx(base.model, tmp_onnx, base.config, card_extra=extra, name=name or out.stem)
        os.replace(tmp_onnx, out)
        os.replace(tmp_onnx.with_suffix(".yaml"), card_path)
    return card_path


def weights_into_graph(base: Base, out: Path) -> str | None:
    """The base ONNX graph with the fine-tuned weights written into its initialisers, in the
    forms onnx_weights.py reads them back from (linear weights transposed, BatchNorm folded into
    the convolution before it). The trunk's folded position embedding is left as it is, so this
    is only for a frozen trunk. Returns how it was checked, or None (export instead) when a
    weight has no place in the graph or torch and onnxruntime then disagree."""
    import onnx
    import torch
    from onnx import numpy_helper

    from .onnx_weights import PREFIX, TOLERANCE, _conv_bn_pairs, check_against_onnx

    model = base.model.eval()
    proto = onnx.load(str(base.file))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: node for node in graph.node for o in node.output}
    conv_bias = {n.input[1]: n.input[2] for n in graph.node if n.op_type == "Conv" and len(n.input) > 2}
    linears: dict[str, str] = {}  # MatMul weight initialiser -> the Linear module it holds
    for node in graph.node:  # Linear: MatMul(x, W^T) then Add(bias), as onnx_weights reads it
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i in inits and i.endswith(".bias")), None)
        matmul = producer.get(next((i for i in node.input if i != bias), None)) if bias else None
        if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in inits:
            linears[matmul.input[1]] = bias[len(PREFIX):-len(".bias")]
    modules = dict(model.named_modules())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out_values: dict[str, np.ndarray] = {}
    for init_name, linear in linears.items():
        if not isinstance(modules.get(linear), torch.nn.Linear):
            return None
        out_values[init_name] = state[linear + ".weight"].T
    folded = set()
    for conv_name, bn_name in _conv_bn_pairs(model):
        key = PREFIX + conv_name + ".weight"
        if key in inits and key in conv_bias:
            bn = modules[bn_name]
            scale = state[bn_name + ".weight"] / np.sqrt(state[bn_name + ".running_var"] + bn.eps)
            out_values[key] = state[conv_name + ".weight"] * scale[:, None, None, None]
            out_values[conv_bias[key]] = state[bn_name + ".bias"] - state[bn_name + ".running_mean"] * scale
            folded.update({conv_name + ".weight", *(f"{bn_name}.{p}" for p in ("weight", "bias", "running_mean",
                                                                               "running_var"))})
    for key, value in state.items():
        if key not in folded and PREFIX + key in inits and PREFIX + key not in out_values:
            out_values[PREFIX + key] = value
    # every weight the graph holds is rewritten, trained or not: the values are the model's
    for init in graph.initializer:
        if init.name in out_values:
            value = np.ascontiguousarray(out_values[init.name], dtype=numpy_helper.to_array(init).dtype)
            if tuple(value.shape) != tuple(init.dims):
                return None
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(proto, str(out))
    difference, scale = check_against_onnx(model, out)
    if not difference <= TOLERANCE * max(1.0, scale):
        out.unlink()
        return None
    return f"weights written into the base graph (max logit difference to torch {difference:.1e})"


def _write_card(base: Base, onnx_path: Path, extra: dict, name: str, how: str) -> None:
    """The card export_onnx would write, for a graph of the base's shape and layout."""
    from ..convert.export import card_dict, write_card
    from ..modeling import count_parameters

    spec = base.raw.get("input", {})
    shape = spec.get("shape") or [-1]
    extra = {**extra, "finetune": {**extra.get("finetune", {}), "written": how}}
    card = card_dict(name, onnx_path, base.config, count_parameters(base.model),
                     "dynamic" if shape[0] in (-1, None, "N") else "1", spec.get("layout", "nchw"), False, None, extra)
    write_card(card, onnx_path.with_suffix(".yaml"))


def check_output(out: Path, overwrite: bool) -> None:
    """--out before any work: an .onnx whose card has room beside it, in a folder we can write."""
    from ..options import check_output_file

    if out.suffix != ".onnx":
        raise InputError(f"--out {out} must end in .onnx (its card is written beside it)")
    for path in (out, out.with_suffix(".yaml")):
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists; choose another --out or pass --overwrite")
        check_output_file(path, "--out")


def finetune(base: Base, data: Labelled, out: Path, settings: Settings, name: str | None = None,
             overwrite: bool = False, progress: Callable[[Progress], None] | None = None,
             command: str | None = None) -> Result:
    """Fine-tune and write the model; progress(Progress) after each step (raise to stop)."""
    check_output(Path(out), overwrite)
    began = time.perf_counter()
    run = iter_finetune(base, data, settings)
    while True:
        try:
            report = next(run)
        except StopIteration as stop:
            before, after = stop.value
            break
        if progress:
            progress(report)
    seconds = time.perf_counter() - began
    card = write_model(base, Path(out), card_extra(base, data, settings, before, after, seconds, command), name,
                       overwrite, settings.trunk)
    return Result(card, Path(out), before, after, seconds)


# --- the command -----------------------------------------------------------------------------


def add_finetune_parser(subparsers) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a few labelled slices (or datasets) and write it as a new model",
        description="Train adapters and decoder for a few hundred steps on box crops of labelled slices, made as "
        "the engine makes them; write ONNX + model card (base, data, steps, validation Dice before/after).",
    )
    p.add_argument("--base", default=None, help="model name, .onnx/.yaml, a run's best.pt or a state dict "
                   "(default: the bundled model)")
    p.add_argument("--config", default=None, help="architecture of an official state dict (default: large)")
    p.add_argument("--image", type=Path, default=None, help="the volume (.nii/.nii.gz)")
    p.add_argument("--labels", type=Path, default=None, help="its label map, on the same grid")
    p.add_argument("--slices", default=None, metavar="K,K,...",
                   help="train only on these slices (other labelled slices score the result)")
    p.add_argument("--label", type=int, action="append", default=None, help="only this label value (repeat)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="instead of --image: case folders, MSD datasets or manifests, as train --data")
    add_data_root_argument(p)
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2))
    p.add_argument("--window", default="auto")
    p.add_argument("--out", type=Path, default=None,
                   help="the .onnx to write, or a folder (default: $SAM2UNET_MODELS, else "
                   "~/.local/share/napari-sam2unet/models); the card goes beside it")
    p.add_argument("--name", default=None, help="model name in the card (default: the file's stem)")
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--batch", type=int, default=Settings.batch)
    p.add_argument("--lr", type=float, default=Settings.lr)
    p.add_argument("--trunk", choices=TRUNK_CHOICES, default=Settings.trunk,
                   help="frozen: adapters and decoder train (default); trained: the trunk too")
    p.add_argument("--deform", type=float, default=Settings.deform,
                   help=f"share of training crops rotated and rescaled a little (default {Settings.deform})")
    p.add_argument("--exact", type=float, default=Settings.exact,
                   help="share of training crops framed exactly as the evaluation's box (outline + 10%%) "
                   f"(default {Settings.exact})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=run_finetune)


def _parse_slices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InputError(f"--slices {text!r}: give slice indices separated by commas, e.g. 10,14,18") from None


def output_path(out: Path | None, base_name: str) -> Path:
    from ..models import models_folder

    if out is None:
        out = models_folder()  # $SAM2UNET_MODELS, else the per-user folder: both are searched
    if out.suffix.lower() != ".onnx":
        if out.suffix and not out.is_dir():  # `--out m.pt` once made a folder m.pt
            raise InputError(f"--out {out} must end in .onnx, or be an existing folder for the model")
        out = out / f"{base_name}-ft-{time.strftime('%Y%m%d-%H%M%S')}.onnx"
    return out


def run_finetune(args) -> int:
    import sys

    if (args.image is None) == (args.data is None):
        raise InputError("give --image IMAGE --labels LABELS, or --data PATH ... (not both)")
    if args.image is not None and args.labels is None:
        raise InputError("--image needs --labels: the label map that holds your labelled slices")
    settings = Settings(args.steps, args.batch, args.lr, args.trunk, args.seed, args.threads, args.deform,
                        args.exact)
    settings.check()
    slices = _parse_slices(args.slices)
    out = output_path(args.out, Path(str(args.base or DEFAULT_NAME)).stem)
    check_output(out, args.overwrite)
    torch = _torch()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    pair = read_pair(args.image, args.labels, args.axis, slices, args.label) if args.image is not None else None
    base = load_base(args.base, args.config)
    if args.image is not None:
        data = file_data(args.image, args.labels, base.spec.channels, args.axis, slices, args.label, args.window,
                         pair)
    else:
        data = cases_data(args.data, base.spec.channels, args.data_root, args.axis, args.window)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"base {base.name}: {base.how}; {len(data.train)} structure slices to train on, "
        f"{len(data.validation)} to score ({data.validation_what})")
    with progress_bar(args.quiet, "step", settings.steps) as bar:

        def progress(report: Progress) -> None:
            if bar is not None:
                bar.n = report.step
                bar.set_postfix_str(report.what if report.loss != report.loss else f"loss {report.loss:.3f}")
            elif report.step and (report.step % 50 == 0 or report.step == report.total) and report.loss == report.loss:
                say(f"step {report.step}/{report.total} loss {report.loss:.3f}")

        result = finetune(base, data, out, settings, args.name, args.overwrite, progress,
                          getattr(args, "command_line", None))
    say(f"validation Dice {result.dice_before:.3f} -> {result.dice_after:.3f} after {settings.steps} steps "
        f"({result.seconds:.0f} s); wrote {result.onnx} and {result.card}")
    _say_where(out, say)
    return 0


def _say_where(out: Path, say) -> None:
    from ..models import MODELS_ENV, search_dirs

    folder = out.parent.resolve()
    if all(folder != d.expanduser().resolve() for d in search_dirs()):
        say(f"note: {folder} is not searched for models; set {MODELS_ENV}={folder} to list it in "
            f"`sam2unet models` and the widget")
