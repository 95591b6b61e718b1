"""`sam2unet finetune`: a few hundred steps on a user's labelled slices, written as a new model.

This module holds the settings, the loop that the command, the fine-tune widget and "Adapt to
this scan" share, and the command. The base model and the written model are finetune_model.py's,
the labelled slices and their crops finetune_data.py's (both importable from here too).
Adapters and decoder train; the trunk is frozen unless asked. BatchNorm keeps its statistics:
a few slices cannot estimate them (and rebuilt models carry them folded).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import Cancelled, InputError
from ..models import DEFAULT_MODEL as DEFAULT_NAME
from ..terminal import progress_bar
from .datasets import add_data_root_argument
from .finetune_data import (
    MIN_PIXELS,
    Item,
    Labelled,
    cases_data,
    file_data,
    read_pair,
    select_slices,
    specs_data,
    training_batch,
    validation_crops,
    volume_data,
)
from .finetune_model import Base, _torch, card_extra, check_output, load_base, weights_into_graph, write_model
from .flags import add_flag

# What callers import from here (the command, the widgets, benchmarks): one place for the API.
__all__ = ["MIN_PIXELS", "TRUNK_CHOICES", "Base", "Item", "Labelled", "Progress", "Result", "Settings", "_torch",
           "card_extra", "cases_data", "check_output", "file_data", "finetune", "iter_finetune", "load_base",
           "read_pair", "select_slices", "specs_data", "trainable", "training_batch", "validation_crops",
           "volume_data", "weights_into_graph", "write_model"]

TRUNK_CHOICES = ("frozen", "trained")  # the --trunk values and the widget's Trunk choices
CANCELLED = "fine-tuning cancelled: no model was written"


@dataclass
class Settings:
    """How a fine-tuning run trains: the command's flags of the same names, and their defaults."""

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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """The settings the command's flags give."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass
class Progress:
    """Where a run is: after a step (loss), or what it does between steps (loss NaN)."""

    step: int
    total: int
    loss: float
    what: str = "training"


@dataclass
class Result:
    """What a run wrote and how the model scored before and after."""

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
    from .train_model import dice_scores, structure_loss

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


def finetune(base: Base, data: Labelled, out: Path, settings: Settings, name: str | None = None,
             overwrite: bool = False, progress: Callable[[Progress], None] | None = None,
             command: str | None = None, cancelled: Callable[[], bool] | None = None) -> Result:
    """Fine-tune and write the model: the command's run and the widget's. progress(Progress) after
    each step; when cancelled() turns true, the run stops there with Cancelled and writes nothing."""
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
        if cancelled and cancelled():
            raise Cancelled(CANCELLED)
    if cancelled and cancelled():
        raise Cancelled(CANCELLED)
    seconds = time.perf_counter() - began
    card = write_model(base, Path(out), card_extra(base, data, settings, before, after, seconds, command), name,
                       overwrite, settings.trunk)
    return Result(card, Path(out), before, after, seconds)


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
    for name in ("steps", "batch", "lr"):
        add_flag(p, Settings, name)
    add_flag(p, Settings, "trunk", choices=TRUNK_CHOICES,
             help="frozen: adapters and decoder train (default); trained: the trunk too")
    add_flag(p, Settings, "deform",
             help=f"share of training crops rotated and rescaled a little (default {Settings.deform})")
    add_flag(p, Settings, "exact", help="share of training crops framed exactly as the evaluation's box "
             f"(outline + 10%%) (default {Settings.exact})")
    add_flag(p, Settings, "seed")
    add_flag(p, Settings, "threads", help="torch CPU threads (0: torch's default)")
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
    settings = Settings.from_args(args)
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
