"""`sam2unet train`: train the bundled box-steered model (or the plain U-Net comparison).

Crops come from a second process (see data.py); the loop keeps a moving average (EMA) of the
weights, checks it on held-out structures, checkpoints, resumes with --resume, and exports the
best EMA weights to ONNX with a model card. The settings are train_settings.py's, the models
and losses train_model.py's, the export train_export.py's. torch is imported only when training runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, require_torch
from ..models import InputSpec
from ..prompt_maps import is_prompted
from .train_export import export, weights_licence
from .train_model import (
    EVAL_SIZE,
    Ema,
    build_model,
    click_rounds,
    dice_scores,
    distill_loss,
    load_initial_weights,
    load_run_model,
    load_teacher,
    structure_loss,
    train_mode,
)
from .train_settings import TrainSettings, add_arguments, input_spec, training_cases

# What callers import from here (benchmarks, tests): one place for the command's API.
__all__ = ["EVAL_SIZE", "TrainSettings", "add_train_parser", "click_rounds", "dice_scores", "export", "input_spec",
           "load_initial_weights", "load_run_model", "load_teacher", "run_train", "structure_loss", "train",
           "weights_licence"]


def _phase(step: int, settings) -> tuple[int, int]:
    """(crop size, batch size) at a step: low resolution first, the contract size at the end."""
    if step >= settings.steps - settings.hires_steps:
        return EVAL_SIZE, settings.hires_batch
    return settings.size, settings.batch


def _lr(step: int, settings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    t = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _drop_log_after(path: Path, step: int) -> None:
    """Forget log lines past the checkpoint a run resumes from: those steps are run again."""
    if not path.is_file():
        return
    def logged_step(line: str):
        try:
            return json.loads(line).get("step")
        except ValueError:  # a line cut short when the run was stopped
            return None

    lines = path.read_text().splitlines()
    kept = [line for line in lines if (logged := logged_step(line)) is not None and logged <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def train(settings: TrainSettings) -> Path:
    """Run (or resume) training; returns the path of the best EMA checkpoint."""
    torch = require_torch("training", "train")
    from . import data as tdata

    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(torch, settings)
    spec, splits = _training_data(settings)
    run = _start_run(torch, settings, device, out)
    teacher = load_teacher(settings.teacher, device) if settings.teacher else None
    validation = tdata.validation_set(spec, (EVAL_SIZE, EVAL_SIZE), splits["validation"], n=settings.val_crops)
    _drop_log_after(out / "log.jsonl", run.step)
    log = open(out / "log.jsonl", "a")
    crops = _Crops(settings, spec, splits["train"])
    meter = _Meter()
    try:
        while run.step < settings.steps:
            size, x, y = crops.get(run.step)
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            loss = _step(torch, run, settings, x, y, teacher)
            run.step += 1
            meter.add(x.shape[0], loss)
            validate = run.step % settings.val_every == 0 or run.step == settings.steps
            if run.step % settings.log_every == 0 or validate:
                line, rate, elapsed = meter.line(run.step, size, _lr(run.step - 1, settings))
                if validate:
                    line["val_dice"] = _validate(torch, run, settings, validation, device, out)
                run.history.append(line)
                log.write(json.dumps(line) + "\n")
                log.flush()
                val = f" val Dice {line['val_dice']:.3f} (best {run.best:.3f})" if "val_dice" in line else ""
                print(
                    f"step {run.step}/{settings.steps} {size}px loss {line['loss']:.3f} "
                    f"{rate:.1f} crops/s {elapsed / 60:.1f} min{val}",
                    flush=True,
                )
    finally:
        crops.close()
        log.close()
    _save_atomic(torch, run.checkpoint(torch, settings), out / "last.pt")
    return out / "best.pt"


def _device(torch, settings):
    """The device to train on; torch's threads and both seeds set."""
    device = torch.device("cuda" if torch.cuda.is_available() and not settings.cpu else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matrix products: convolutions already use it
    if device.type == "cpu" and settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    return device


def _training_data(settings) -> tuple[InputSpec, dict]:
    """The input spec and the cases by split. Every training case is read once here: a bad file
    stops the run with its name, before any step (the crop stream reads them again in its own
    process)."""
    from .sources import load_sources

    splits = training_cases(settings)
    load_sources(splits["train"])
    return input_spec(settings), splits


@dataclass
class _Run:
    """The model, its EMA and optimiser, and how far the run has come: what last.pt holds."""

    model: object
    ema: Ema
    opt: object
    step: int = 0
    best: float = -1.0  # the best validation Dice so far
    history: list = field(default_factory=list)  # the log lines

    def checkpoint(self, torch, settings) -> dict:
        return {
            "model": self.model.state_dict(), "ema": self.ema.model.state_dict(), "ema_updates": self.ema.updates,
            "opt": self.opt.state_dict(), "step": self.step, "best": self.best, "history": self.history,
            "torch_rng": torch.get_rng_state(), "args": saved_args(settings),
        }

    def resume(self, torch, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.opt.load_state_dict(state["opt"])
        self.step, self.best, self.history = state["step"], state["best"], state["history"]
        torch.set_rng_state(state["torch_rng"])


def _start_run(torch, settings, device, out: Path) -> _Run:
    """A new model and optimiser, or with --resume the run in `out` where its last.pt left it."""
    model = build_model(settings.arch, settings.config).to(device)
    init = settings.init
    if init and not (settings.resume and (out / "last.pt").is_file()):
        load_initial_weights(torch, model, init, settings.channels)
        print(f"initialised from {init}", flush=True)
    # Weights from an ONNX file have BatchNorm folded into their convolutions: it stays frozen for
    # the whole run, a resumed one too (a batch's statistics would undo the folding).
    model.frozen_batchnorm = bool(init) and Path(init).suffix != ".pt"
    ema = Ema(model, settings.ema)
    run = _Run(model, ema, torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay))
    last_path = out / "last.pt"
    if settings.resume and last_path.is_file():
        from .checkpoint_file import load_checkpoint

        run.resume(torch, load_checkpoint(last_path, "--resume", device))
        print(f"resumed from {last_path} at step {run.step}", flush=True)
    elif settings.resume:
        print(f"--resume: no checkpoint in {out}, starting from scratch", flush=True)
    elif last_path.is_file():
        # A fresh run would overwrite that run's checkpoints and mix into its log.
        raise InputError(
            f"{out} already holds a training run ({last_path.name}); pass --resume to continue it "
            "or choose another --out-dir"
        )
    return run


class _Crops:
    """Training batches: a crop stream, opened again whenever the phase (crop size, batch) changes."""

    def __init__(self, settings, spec: InputSpec, cases: list):
        self.settings, self.spec, self.cases = settings, spec, cases
        self.stream, self.phase = None, None

    def get(self, step: int):
        """(crop size, images, masks) for a step."""
        from .data import CropStream

        phase = _phase(step, self.settings)
        if phase != self.phase:
            self.close()
            # The data stream is seeded by (seed, step): a resumed run is reproducible too.
            self.stream = CropStream(self.settings.seed * 100003 + step, self.spec, (phase[0],) * 2, phase[1],
                                     self.cases, workers=self.settings.workers,
                                     click_crop_extent=tuple(self.settings.click_crop_extent),
                                     wrong_object_share=self.settings.wrong_object_share)
            self.phase = phase
        return (phase[0], *self.stream.get())

    def close(self) -> None:
        if self.stream:
            self.stream.close()


def _step(torch, run: _Run, settings, x, y, teacher) -> float:
    """One optimiser step on a batch (and the EMA's); returns the loss."""
    for group in run.opt.param_groups:
        group["lr"] = _lr(run.step, settings)
    spec = input_spec(settings)
    if settings.arch == "sam2unet" and is_prompted(spec):
        x = click_rounds(torch, run.model, x, y, spec, np.random.default_rng([settings.seed, run.step]),
                         settings.click_rounds, settings.click_share)
    train_mode(run.model)
    # The plain U-Net returns its one map three times; SAM2-UNet's three heads all learn.
    outs = run.model(x)[: 1 if settings.arch == "unet" else 3]
    loss = sum(structure_loss(o, y) for o in outs)
    if teacher is not None:
        loss = loss + settings.distill_weight * distill_loss(teacher, x, outs)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.opt.step()
    run.ema.update(run.model)
    return loss.item()


class _Meter:
    """Mean loss and speed since the last log line, time since the start."""

    def __init__(self):
        self.start = self.since = time.time()
        self.seen, self.losses = 0, []

    def add(self, crops: int, loss: float) -> None:
        self.seen += crops
        self.losses.append(loss)

    def line(self, step: int, size: int, lr: float) -> tuple[dict, float, float]:
        """(log line, crops per second, seconds since the start); starts the next interval."""
        now = time.time()
        rate, elapsed = self.seen / (now - self.since), now - self.start
        line = {
            "step": step, "size": size, "loss": float(np.mean(self.losses)),
            "lr": lr, "crops_per_s": round(rate, 1), "elapsed_s": round(elapsed),
        }
        self.seen, self.losses, self.since = 0, [], now
        return line, rate, elapsed


def _trained_on(torch, device) -> str:
    """The machine a checkpoint was trained on, for the card (a GPU's name, or the CPU's cores)."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _validate(torch, run: _Run, settings, validation, device, out: Path) -> float:
    """Validation Dice of the EMA weights; best.pt when it is the best so far, last.pt always."""
    dice = dice_scores(run.ema.model, *validation, device)
    if dice > run.best:
        run.best = dice
        _save_atomic(torch, {"ema": run.ema.model.state_dict(), "step": run.step, "val_dice": dice,
                             "args": saved_args(settings), "trained_on": _trained_on(torch, device)}, out / "best.pt")
    _save_atomic(torch, run.checkpoint(torch, settings), out / "last.pt")
    return dice


def saved_args(settings) -> dict:
    """The run's settings as plain values (a command's namespace less its function): a checkpoint
    does not depend on the names of this module's functions."""
    return {k: v for k, v in vars(settings).items() if k != "func"}


def _save_atomic(torch, state: dict, path: Path) -> None:
    """A checkpoint is either the old one or the new one, never half written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def add_train_parser(subparsers) -> None:
    """`sam2unet train`: train the box-steered model and export it."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="train the bundled box-steered model (or the plain U-Net comparison)",
        description="Train on box crops of real scans, synthetic contrasts and synthetic lesions; "
        "export the best EMA weights to ONNX with a model card.",
    )
    add_arguments(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    settings = TrainSettings.from_args(args)
    settings.check()
    require_torch("training", "train")  # one line saying what to install, before modeling imports torch
    if settings.arch == "sam2unet":
        from ..modeling.configs import CONFIGS

        if settings.config not in CONFIGS:
            raise InputError(f"unknown --config {settings.config!r}; use one of {', '.join(CONFIGS)}")
    if settings.size % 32:
        raise InputError(f"--size must be a multiple of 32, got {settings.size}")
    if settings.hires_steps > settings.steps:
        raise InputError("--hires-steps cannot exceed --steps")
    best = Path(settings.out_dir) / "best.pt"
    if not settings.export_only:
        best = train(settings)
    if settings.export:
        if not best.is_file():
            raise InputError(f"no checkpoint {best} to export; train first")
        export(settings, best)
    return 0
