"""`sam2unet train`'s settings: one dataclass, its flags (defaults read from it) and their checks."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import InputError
from ..models import CHANNEL_MODES, CROP_MODES, INPUT_SIZE, MARGIN, InputSpec
from .data import CLICK_CROP_EXTENT, WRONG_OBJECT_SHARE
from .datasets import add_data_root_argument
from .flags import add_flag

ARCHS = ("sam2unet", "unet")


@dataclass
class TrainSettings:
    """How a run trains and exports: the command's flags of the same names, and their defaults."""

    arch: str = "sam2unet"  # unet: the plain U-Net comparison
    config: str = "compact"
    data: list[str] | None = None  # None: the bundled model's manifest
    val_data: list[str] | None = None
    data_root: str | None = None  # the command's default is $SAM2UNET_DATA
    out_dir: str = "runs/compact"
    export: str | None = None
    name: str | None = None
    steps: int = 3000
    hires_steps: int = 0
    size: int = 192
    batch: int = 16
    hires_batch: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 150
    weight_decay: float = 0.01
    ema: float = 0.998
    channels: str = "multiview"
    init: str | None = None
    click_rounds: int = 2
    click_share: float = 0.5
    click_crop_extent: tuple[float, float] = CLICK_CROP_EXTENT
    wrong_object_share: float = WRONG_OBJECT_SHARE
    crop: str = "box_aspect"
    margin: float = MARGIN
    seed: int = 0
    val_crops: int = 160
    val_every: int = 200
    log_every: int = 20
    threads: int = 0  # 0: torch's default
    cpu: bool = False
    workers: int = 1
    teacher: str | None = None
    distill_weight: float = 1.0
    resume: bool = False
    export_only: bool = False
    command_line: str | None = None  # the command as typed, for the card

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainSettings:
        """The settings the command's flags give."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def check(self) -> None:
        """Every number and output place, in one line each, before any data is read or a step runs."""
        from .. import options as o

        o.check_threads(self.threads, zero_is_default=True)
        for option, value, low in (("--steps", self.steps, 1), ("--batch", self.batch, 1),
                                   ("--hires-batch", self.hires_batch, 1), ("--hires-steps", self.hires_steps, 0),
                                   ("--size", self.size, 32), ("--warmup", self.warmup, 0),
                                   ("--click-rounds", self.click_rounds, 0), ("--val-crops", self.val_crops, 1),
                                   ("--val-every", self.val_every, 1), ("--log-every", self.log_every, 1),
                                   ("--workers", self.workers, 1)):
            o.check_count(option, value, low)
        o.check_positive("--lr", self.lr)
        for option, value in (("--min-lr", self.min_lr), ("--weight-decay", self.weight_decay),
                              ("--distill-weight", self.distill_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"{option} {value} must be a finite number, 0 or above")
        for option, value in (("--ema", self.ema), ("--click-share", self.click_share),
                              ("--wrong-object-share", self.wrong_object_share)):
            o.check_share(option, value)
        low, high = self.click_crop_extent
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high <= 20):
            raise InputError(f"--click-crop-extent {low} {high}: give two sizes relative to the structure, "
                             "0 < LOW < HIGH <= 20 (e.g. 0.7 4)")
        if not (math.isfinite(self.margin) and 0 <= self.margin <= 10):
            raise InputError(f"--margin {self.margin} is a share of the box's side: use 0 to 10")
        out_dir = Path(self.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"--out-dir {out_dir} is a file; give a folder for the checkpoints and log")
        if not self.export_only:
            o.check_folder_writable(out_dir, "--out-dir")
        if self.export:
            if Path(self.export).suffix != ".onnx":
                raise InputError(f"--export {self.export} must end in .onnx (its card is written beside it)")
            o.check_output_file(Path(self.export), "--export")


def input_spec(settings) -> InputSpec:
    """How the model is fed (settings: a TrainSettings, or a checkpoint's saved settings)."""
    return InputSpec(channels=settings.channels, crop=settings.crop, margin=settings.margin)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's flags; each default is TrainSettings'."""

    def flag(name: str, **options) -> None:
        add_flag(p, TrainSettings, name, **options)

    flag("arch", choices=ARCHS)
    flag("config", help="SAM2-UNet config (compact, compact_s, ...)")
    flag("data", nargs="+", metavar="PATH",
         help="case folders, folders of them, MSD/nnU-Net datasets (dataset.json) or manifests "
         "(.yaml/.json with splits); default: the bundled model's manifest")
    flag("val_data", nargs="+", metavar="PATH",
         help="validation cases, in the same layouts (manifests keep their own splits)")
    add_data_root_argument(p)
    flag("out_dir", help="checkpoints and log.jsonl")
    flag("export", help="write the best EMA model to this .onnx (+ card)")
    flag("name", help="model name in the card (default: file stem)")
    flag("steps")
    flag("hires_steps", help=f"final steps at {INPUT_SIZE} px (models without a work size)")
    flag("size", help="crop size before the final steps")
    for name in ("batch", "hires_batch", "lr", "min_lr", "warmup", "weight_decay", "ema"):
        flag(name)
    flag("channels", choices=CHANNEL_MODES,
         help="multiview: three intensity views; prompted: one view, a prior mask and clicks "
         "(the model follows corrections; prompt_maps.py)")
    flag("init", metavar="MODEL",
         help="start from these weights: a run's best.pt or an fp32 SAM2-UNet .onnx / card of the "
         "same config (its stem's views are summed into channel 0 when the channels change)")
    flag("click_rounds", help="prompted models: up to this many rounds of clicks on the model's own errors per batch")
    flag("click_share", help="prompted models: share of batches that get those rounds")
    flag("click_crop_extent", nargs=2, type=float, metavar=("LOW", "HIGH"),
         help="prompted models: a click's training crop spans LOW-HIGH times the structure (log-uniform)")
    flag("wrong_object_share", help="prompted models: share of correction crops whose prior is the wrong "
         "structure (one beside the target, a ring's hole) with clicks that say so")
    flag("crop", choices=CROP_MODES)
    for name in ("margin", "seed", "val_crops", "val_every", "log_every"):
        flag(name)
    flag("threads", help="torch CPU threads (0: torch's default)")
    flag("cpu", help="stay on the CPU even if CUDA is present")
    flag("workers", help="crop-making processes (one makes ~85 crops/s on one core: give a GPU 4-14)")
    flag("teacher", metavar="BEST_PT",
         help="distil from another run's best.pt (e.g. the plain U-Net's) as well as the labels")
    flag("distill_weight")
    flag("resume", help="continue from OUT_DIR/last.pt")
    flag("export_only", help="only export OUT_DIR/best.pt")


def training_cases(settings) -> dict:
    """The run's cases by split (train, validation, test), from --data and --val-data."""
    from .datasets import default_manifest, find_cases
    from .sources import split_cases

    root = settings.data_root or None
    cases = find_cases(settings.data or [default_manifest()], "train", root)
    if settings.val_data:
        cases += find_cases(settings.val_data, "validation", root)
    splits = split_cases(cases)
    if not splits["train"]:
        raise InputError("no training cases: give --data with cases in the train split")
    if not splits["validation"]:
        raise InputError("no validation cases: give --val-data, or mark cases 'split: validation' in a manifest")
    return splits
