"""`sam2unet train`: train the bundled box-steered model (or the plain U-Net comparison).

Crops come from a second process (see data.py); the loop keeps a moving average (EMA) of the
weights, checks it on held-out structures, checkpoints, resumes with --resume, and exports the
best EMA weights to ONNX with a model card. torch is imported only when training runs.
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
from ..models import CHANNEL_MODES, CROP_MODES, INPUT_SIZE, MARGIN, InputSpec
from ..prompt_maps import PROMPTED, is_prompted
from .datasets import add_data_root_argument

EVAL_SIZE = INPUT_SIZE  # the model contract; validation always runs at this size


def structure_loss(pred, mask):
    """Weighted BCE + weighted IoU, pixels near edges weighted up (as SAM2-UNet upstream)."""
    torch = require_torch("training", "train")
    F = torch.nn.functional
    size = mask.shape[-1]
    k = max(3, int(round(31 * size / EVAL_SIZE)) | 1)
    weight = 1 + 5 * torch.abs(F.avg_pool2d(mask, k, stride=1, padding=k // 2) - mask)
    bce = F.binary_cross_entropy_with_logits(pred, mask, reduction="none")
    bce = (weight * bce).sum((2, 3)) / weight.sum((2, 3))
    prob = torch.sigmoid(pred)
    inter = (prob * mask * weight).sum((2, 3))
    union = ((prob + mask) * weight).sum((2, 3))
    iou = 1 - (inter + 1) / (union - inter + 1)
    return (bce + iou).mean()


def load_run_model(path, device, what: str = "checkpoint"):
    """The best EMA weights of a `sam2unet train` run (its best.pt), built as that run's model."""
    from .checkpoint_file import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; give a run's best.pt")
    state = load_checkpoint(path, what, device)  # weights only: a pickle cannot run code
    if "ema" not in state or "args" not in state:
        raise InputError(f"{what} {path} is not a checkpoint written by `sam2unet train`")
    saved = state["args"]
    model = build_model(saved["arch"], saved["config"]).to(device)
    model.load_state_dict(state["ema"])
    return model.eval(), saved


def load_teacher(path, device):
    """A trained run's model, frozen, to distil from."""
    teacher, _ = load_run_model(path, device, "--teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_loss(teacher, x, outs):
    """BCE of each output against the teacher's probabilities on the same crops.

    The teacher's soft maps average out the noise in the targets (outlines grown or shrunk at
    random, faint synthetic lesions), which a model that fits its crops poorly learns from.
    """
    torch = require_torch("training", "train")
    with torch.no_grad():
        soft = torch.sigmoid(teacher(x)[0])
    F = torch.nn.functional
    return sum(F.binary_cross_entropy_with_logits(o, soft) for o in outs)


def build_model(arch: str, config: str):
    if arch == "sam2unet":
        try:
            from ..modeling import build_sam2unet
        except ImportError as error:
            raise InputError(f"the SAM2-UNet modeling package cannot be imported ({error})") from None
        return build_sam2unet(config)
    if arch == "unet":
        from .unet import PlainUNet

        return PlainUNet()
    raise InputError(f"unknown --arch {arch!r}; use sam2unet or unet")


class Ema:
    """Exponential moving average of a model's weights and floating-point buffers."""

    def __init__(self, model, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def update(self, model):
        torch = require_torch("training", "train")
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for e, p in zip(self.model.parameters(), model.parameters()):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
            # BatchNorm statistics are averaged too: the live model's statistics belong to the
            # live weights, and with averaged weights they broke validation now and then.
            for e, b in zip(self.model.buffers(), model.buffers()):
                if e.dtype.is_floating_point:
                    e.mul_(d).add_(b.detach(), alpha=1 - d)
                else:
                    e.copy_(b)


def dice_scores(model, xs, ys, device, batch=8) -> float:
    """Mean per-crop Dice of thresholded predictions on a fixed crop set."""
    torch = require_torch("training", "train")
    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(xs), batch):
            x = torch.from_numpy(xs[i : i + batch]).to(device)
            pred = (model(x)[0] > 0).float().cpu().numpy()
            y = ys[i : i + batch]
            inter = (pred * y).sum((1, 2, 3))
            scores.extend(2 * inter / (pred.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1e-6))
    return float(np.mean(scores))


def input_spec(args) -> InputSpec:
    return InputSpec(channels=args.channels, crop=args.crop, margin=args.margin)


def _phase(step: int, args) -> tuple[int, int]:
    """(crop size, batch size) at a step: low resolution first, the contract size at the end."""
    if step >= args.steps - args.hires_steps:
        return EVAL_SIZE, args.hires_batch
    return args.size, args.batch


def _lr(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


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


def train(args) -> Path:
    """Run (or resume) training; returns the path of the best EMA checkpoint."""
    torch = require_torch("training", "train")
    from . import data as tdata

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(torch, args)
    spec, splits = _training_data(args)
    run = _start_run(torch, args, device, out)
    teacher = load_teacher(args.teacher, device) if args.teacher else None
    validation = tdata.validation_set(spec, (EVAL_SIZE, EVAL_SIZE), splits["validation"], n=args.val_crops)
    _drop_log_after(out / "log.jsonl", run.step)
    log = open(out / "log.jsonl", "a")
    crops = _Crops(args, spec, splits["train"])
    meter = _Meter()
    try:
        while run.step < args.steps:
            size, x, y = crops.get(run.step)
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            loss = _step(torch, run, args, x, y, teacher)
            run.step += 1
            meter.add(x.shape[0], loss)
            validate = run.step % args.val_every == 0 or run.step == args.steps
            if run.step % args.log_every == 0 or validate:
                line, rate, elapsed = meter.line(run.step, size, _lr(run.step - 1, args))
                if validate:
                    line["val_dice"] = _validate(torch, run, args, validation, device, out)
                run.history.append(line)
                log.write(json.dumps(line) + "\n")
                log.flush()
                val = f" val Dice {line['val_dice']:.3f} (best {run.best:.3f})" if "val_dice" in line else ""
                print(
                    f"step {run.step}/{args.steps} {size}px loss {line['loss']:.3f} "
                    f"{rate:.1f} crops/s {elapsed / 60:.1f} min{val}",
                    flush=True,
                )
    finally:
        crops.close()
        log.close()
    _save_atomic(torch, run.checkpoint(torch, args), out / "last.pt")
    return out / "best.pt"


def _device(torch, args):
    """The device to train on; torch's threads and both seeds set."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    return device


def _training_data(args) -> tuple[InputSpec, dict]:
    """The input spec and the cases by split. Every training case is read once here: a bad file
    stops the run with its name, before any step (the crop stream reads them again in its own
    process)."""
    from .sources import load_sources

    splits = training_cases(args)
    load_sources(splits["train"])
    return input_spec(args), splits


@dataclass
class _Run:
    """The model, its EMA and optimiser, and how far the run has come: what last.pt holds."""

    model: object
    ema: Ema
    opt: object
    step: int = 0
    best: float = -1.0  # the best validation Dice so far
    history: list = field(default_factory=list)  # the log lines

    def checkpoint(self, torch, args) -> dict:
        return {
            "model": self.model.state_dict(), "ema": self.ema.model.state_dict(), "ema_updates": self.ema.updates,
            "opt": self.opt.state_dict(), "step": self.step, "best": self.best, "history": self.history,
            "torch_rng": torch.get_rng_state(), "args": saved_args(args),
        }

    def resume(self, torch, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.opt.load_state_dict(state["opt"])
        self.step, self.best, self.history = state["step"], state["best"], state["history"]
        torch.set_rng_state(state["torch_rng"])


def _start_run(torch, args, device, out: Path) -> _Run:
    """A new model and optimiser, or with --resume the run in `out` where its last.pt left it."""
    model = build_model(args.arch, args.config).to(device)
    init = getattr(args, "init", None)
    if init and not (args.resume and (out / "last.pt").is_file()):
        load_initial_weights(torch, model, init, args.channels)
        print(f"initialised from {init}", flush=True)
    # Weights from an ONNX file have BatchNorm folded into their convolutions: it stays frozen for
    # the whole run, a resumed one too (a batch's statistics would undo the folding).
    model.frozen_batchnorm = bool(init) and Path(init).suffix != ".pt"
    ema = Ema(model, args.ema)
    run = _Run(model, ema, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay))
    last_path = out / "last.pt"
    if args.resume and last_path.is_file():
        from .checkpoint_file import load_checkpoint

        run.resume(torch, load_checkpoint(last_path, "--resume", device))
        print(f"resumed from {last_path} at step {run.step}", flush=True)
    elif args.resume:
        print(f"--resume: no checkpoint in {out}, starting from scratch", flush=True)
    elif last_path.is_file():
        # A fresh run would overwrite that run's checkpoints and mix into its log.
        raise InputError(
            f"{out} already holds a training run ({last_path.name}); pass --resume to continue it "
            "or choose another --out-dir"
        )
    return run


def load_initial_weights(torch, model, path, channels: str) -> None:
    """Weights to start from: a run's best.pt, or an fp32 SAM2-UNet ONNX file (with its card).

    A multiview stem moving to prompted channels keeps what it learnt: its three views' filters
    are summed into channel 0 (the views are one intensity, differently curved), and the prompt
    channels start at zero, so step 0 is the old model seeing one view."""
    from .onnx_weights import NOT_IN_GRAPH

    path = Path(path)
    if path.suffix == ".pt":
        from .checkpoint_file import load_checkpoint

        state = load_checkpoint(path, "--init")
        if "ema" not in state:
            raise InputError(f"--init {path} is not a best.pt written by `sam2unet train`")
        weights, old_channels = state["ema"], (state.get("args") or {}).get("channels", "multiview")
    else:
        from ..models import find_model
        from .onnx_weights import model_from_onnx

        card = find_model(str(path))
        weights, old_channels = model_from_onnx(card)[0].state_dict(), card.input.channels
    # The side heads are not in an ONNX file (they never reach the prediction): they start afresh.
    weights = {k: v for k, v in weights.items() if not k.startswith(NOT_IN_GRAPH)}
    stem = next(k for k in weights if k.endswith("patch_embed.proj.weight"))
    if channels == PROMPTED != old_channels:
        merged = weights[stem].clone()
        merged[:, 0] = weights[stem].sum(1)
        merged[:, 1:] = 0
        weights[stem] = merged
    try:
        missing = model.load_state_dict(weights, strict=False).missing_keys
    except RuntimeError:  # shapes of another config
        raise InputError(f"--init {path} holds weights of another SAM2-UNet config than --config") from None
    lacking = [k for k in missing if not k.startswith(NOT_IN_GRAPH)]
    if lacking:
        raise InputError(f"--init {path} lacks weights of this config, e.g. {lacking[0]}")


def train_mode(model) -> None:
    """Training mode; BatchNorm stays in eval mode for a model started from folded weights (a
    batch's statistics would undo the folding)."""
    model.train()
    if getattr(model, "frozen_batchnorm", False):
        for module in model.modules():
            if "BatchNorm" in type(module).__name__:
                module.eval()


class _Crops:
    """Training batches: a crop stream, opened again whenever the phase (crop size, batch) changes."""

    def __init__(self, args, spec: InputSpec, cases: list):
        self.args, self.spec, self.cases = args, spec, cases
        self.stream, self.phase = None, None

    def get(self, step: int):
        """(crop size, images, masks) for a step."""
        from .data import CropStream

        phase = _phase(step, self.args)
        if phase != self.phase:
            self.close()
            # The data stream is seeded by (seed, step): a resumed run is reproducible too.
            self.stream = CropStream(self.args.seed * 100003 + step, self.spec, (phase[0],) * 2, phase[1], self.cases,
                                     workers=getattr(self.args, "workers", 1))
            self.phase = phase
        return (phase[0], *self.stream.get())

    def close(self) -> None:
        if self.stream:
            self.stream.close()


def _step(torch, run: _Run, args, x, y, teacher) -> float:
    """One optimiser step on a batch (and the EMA's); returns the loss."""
    for group in run.opt.param_groups:
        group["lr"] = _lr(run.step, args)
    if args.arch == "sam2unet" and is_prompted(input_spec(args)):
        x = click_rounds(torch, run.model, x, y, input_spec(args), np.random.default_rng([args.seed, run.step]),
                         args.click_rounds, args.click_share)
    train_mode(run.model)
    # The plain U-Net returns its one map three times; SAM2-UNet's three heads all learn.
    outs = run.model(x)[: 1 if args.arch == "unet" else 3]
    loss = sum(structure_loss(o, y) for o in outs)
    if teacher is not None:
        loss = loss + args.distill_weight * distill_loss(teacher, x, outs)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.opt.step()
    run.ema.update(run.model)
    return loss.item()


def click_rounds(torch, model, x, y, spec: InputSpec, rng, rounds: int, share: float):
    """Rounds of clicks on the model's own errors, as users correct (interactive training):
    run the model, click the middle of each crop's largest error, make its mask the prior, repeat.
    Applied to `share` of the batches, 1..rounds rounds each."""
    from ..prompt_maps import click_map, read_clicks, write_prompts
    from .prompt_sim import error_click

    if rounds < 1 or rng.random() >= share:
        return x
    model.eval()
    inputs = x.detach().cpu().numpy().copy()
    targets = y.detach().cpu().numpy()[:, 0] > 0.5
    clicks = read_clicks(inputs, spec)
    size = inputs.shape[-2:]
    with torch.no_grad():
        for _ in range(int(rng.integers(1, rounds + 1))):
            masks = (model(torch.from_numpy(inputs).to(x.device))[0] > 0).cpu().numpy()[:, 0]
            for b in range(len(inputs)):
                click = error_click(masks[b], targets[b])
                if click is not None:
                    spot = click_map([click], size)
                    clicks[b] = np.maximum(clicks[b], spot) if click[2] else np.minimum(clicks[b], spot)
                write_prompts(inputs[b], masks[b].astype(np.float32), clicks[b], spec)
    return torch.from_numpy(inputs).to(x.device)


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


def _validate(torch, run: _Run, args, validation, device, out: Path) -> float:
    """Validation Dice of the EMA weights; best.pt when it is the best so far, last.pt always."""
    dice = dice_scores(run.ema.model, *validation, device)
    if dice > run.best:
        run.best = dice
        _save_atomic(torch, {"ema": run.ema.model.state_dict(), "step": run.step, "val_dice": dice,
                             "args": saved_args(args), "trained_on": _trained_on(torch, device)}, out / "best.pt")
    _save_atomic(torch, run.checkpoint(torch, args), out / "last.pt")
    return dice


def saved_args(args) -> dict:
    """The run's settings as plain values: no function objects, so a checkpoint does not depend
    on the names of this module's functions."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def _save_atomic(torch, state: dict, path: Path) -> None:
    """A checkpoint is either the old one or the new one, never half written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def training_cases(args) -> dict:
    """The run's cases by split (train, validation, test), from --data and --val-data."""
    from .datasets import default_manifest, find_cases
    from .sources import split_cases

    root = args.data_root or None
    cases = find_cases(args.data or [default_manifest()], "train", root)
    if args.val_data:
        cases += find_cases(args.val_data, "validation", root)
    splits = split_cases(cases)
    if not splits["train"]:
        raise InputError("no training cases: give --data with cases in the train split")
    if not splits["validation"]:
        raise InputError("no validation cases: give --val-data, or mark cases 'split: validation' in a manifest")
    return splits


# Words in a case's licence that forbid shipping weights trained on it under Apache-2.0.
RESTRICTIVE_LICENCE_WORDS = ("nc", "non commercial", "noncommercial", "measuring only", "gpl", "not restated")


def weights_licence(train_cases) -> str:
    """Apache-2.0 only when every training case's licence is stated and allows shipping weights."""
    def restrictive(licence: str) -> bool:
        # Whole words only ("nc" in "CC BY-NC-SA", not in "since"): punctuation becomes spaces.
        text = " " + " ".join("".join(c if c.isalnum() or c == "." else " " for c in licence.lower()).split()) + " "
        return not licence or any(f" {words} " in text for words in RESTRICTIVE_LICENCE_WORDS)

    blocked = sorted({c.licence or "unstated" for c in train_cases if restrictive(c.licence)})
    if not blocked:
        return "Apache-2.0"
    return "not for redistribution: trained on data under " + "; ".join(blocked)


# What a prompted card says its input channels hold (prompt_maps.py draws them).
PROMPT_CARD = {
    "channel_0": "the intensity window (CT preset or MR percentiles), the crop resized to the input",
    "channel_1": "prior mask, 0..1, in the crop's frame: the neighbouring slice's mask when propagating or "
                 "interpolating, the current mask when correcting; 0 for a box alone",
    "channel_2": "clicks: 0.5 where there is none, a Gaussian (sigma 0.02 of the input side) up to 1 at a "
                 "positive click and down to 0 at a negative one",
    "normalisation": "each channel like an image channel: x * scale (0..255 -> 0..1), minus mean, over std",
    "box": "the crop itself: the box plus the card's margin, resized to the input",
}


def simulated_users(args) -> str:
    """How a prompted model's training crops prompt it, for the card (data.py, click_rounds)."""
    from .data import PAST_END_SHARE, PROMPT_MODE_SHARES, PROMPT_MODES

    shares = ", ".join(f"{mode} {share:.0%}" for mode, share in zip(PROMPT_MODES, PROMPT_MODE_SHARES))
    return (f"crops by prompt: {shares}. box: a jittered box alone; propagate: the box of a slice 1-3 away and "
            f"its mask (shifted, grown or shrunk) as the prior, {PAST_END_SHARE:.0%} of them past the structure's "
            "end (the target empty); correct: a flawed prior (eroded, dilated, cut, leaking, smoothed) and 0-3 "
            "clicks on its errors; clicks: 1-3 positive and 0-2 negative clicks near the structure in a loose "
            f"crop. Then {args.click_share:.0%} of batches get 1-{args.click_rounds} rounds of a click on the "
            "model's own largest error with its mask as the prior, as users correct")


def card_extra(args, best_state, trained_steps: int | None = None) -> dict:
    """What the card says about the model's input and training (metrics are added by eval)."""
    splits = training_cases(args)
    steps = {"steps": trained_steps or args.steps}
    if trained_steps and trained_steps != args.steps:
        steps["schedule_steps"] = args.steps  # stopped before its schedule ended (then resumed or not)
    outputs = "all three outputs" if args.arch == "sam2unet" else "its one output"
    return {
        "input": {"channels": args.channels, "crop": args.crop, "margin": args.margin},
        "licence": weights_licence(splits["train"]),
        "task": ("class-agnostic segmentation of one structure on an MRI or CT slice, steered by a box, clicks "
                 "and a prior mask in its input channels" if args.channels == PROMPTED else
                 "class-agnostic box-steered segmentation of one structure per box on an MRI or CT slice"),
        **({"prompts": PROMPT_CARD} if args.channels == PROMPTED else {}),
        "training": {
            "command": args.command_line,
            "seed": args.seed,
            **steps,
            "chosen_step": int(best_state.get("step", args.steps)),
            "validation_dice": round(float(best_state.get("val_dice", float("nan"))), 4),
            "resolution": (f"{args.size}px crops, batch {args.batch}"
                           + (f"; then {args.hires_steps} steps at {EVAL_SIZE}px, batch {args.hires_batch}"
                              if args.hires_steps else "")),
            "loss": f"weighted BCE + weighted IoU on {outputs}"
            + (f" + {args.distill_weight} x BCE against the teacher's probabilities" if args.teacher else ""),
            **({"teacher": str(args.teacher)} if args.teacher else {}),
            **({"initialised_from": str(args.init)} if getattr(args, "init", None) else {}),
            **({"simulated_users": simulated_users(args)} if args.channels == PROMPTED else {}),
            "ema_decay": args.ema,
            **({"trained_on": best_state["trained_on"]} if best_state.get("trained_on") else {}),
        },
        "data": training_data_note(splits),
    }


def training_data_note(splits: dict) -> dict:
    """Every case of every split with its patient, source and licence, for the model card."""
    from .data import MARGIN_RANGE

    def describe(case):
        entry = {"case": case.name, "patient": case.patient}
        if case.licence:
            entry["licence"] = case.licence
        if case.source:
            entry["source"] = case.source
        return entry

    return {
        "images": "the real scans (jittered windows), synthetic contrasts drawn from their label maps "
        "(SynthSeg-style: random intensity per label, bias field, noise, blur, gamma, deformation), "
        "real scans with remapped intensities, and synthetic lesions painted into all three; "
        f"crop margins drawn from {list(MARGIN_RANGE)}, boxes jittered",
        "split": "by patient: no patient is in two splits",
        "train": [describe(c) for c in splits["train"]],
        "validation": [describe(c) for c in splits["validation"]],
        "test": [describe(c) for c in splits.get("test", [])],
    }


def _training_args(args, state: dict) -> argparse.Namespace:
    """The run's last settings (architecture, steps, command) with this call's export target.

    `--export-only` may be called without repeating the training options: the model must be
    built, and its card written, from what the checkpoint was trained with.
    """
    this_call = {"export", "name", "export_only", "out_dir", "data_root", "threads", "cpu", "func"}
    saved = {k: v for k, v in (state.get("args") or {}).items() if k not in this_call}
    return argparse.Namespace(**{**vars(args), **saved})


def export(args, best_path: Path) -> Path:
    """Export the best EMA weights: ONNX + model card."""
    from .checkpoint_file import load_checkpoint

    state = load_checkpoint(best_path, "--export")  # weights only: a pickle cannot run code
    if "ema" not in state:
        raise InputError(f"{best_path} is not a best.pt written by `sam2unet train`")
    trained_steps = None
    if args.export_only:
        last = best_path.with_name("last.pt")
        run_state = load_checkpoint(last, "--export-only") if last.is_file() else state
        args = _training_args(args, run_state)
        trained_steps = run_state.get("step")
    model = build_model(args.arch, args.config)
    model.load_state_dict(state["ema"])
    model.eval()
    onnx_path = Path(args.export)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    extra = card_extra(args, state, trained_steps)
    if args.arch == "sam2unet":
        from ..convert.export import export_onnx

        card = export_onnx(model, onnx_path, args.config, card_extra=extra, name=args.name)
    else:
        card = export_plain(model, onnx_path, extra, args.name)
    print(f"wrote {onnx_path} and {card}", flush=True)
    return card


def export_plain(model, onnx_path: Path, extra: dict, name: str | None) -> Path:
    """Export a plain torch model (first output only) with a card."""
    from ..convert.export import merge_card
    from ..convert.graph import INPUT_NAME, OUTPUT_NAME, first_logits_module, trace_onnx
    from ..models import card_fields, write_card

    trace_onnx(first_logits_module(model, "nchw").eval(), onnx_path)
    spec = InputSpec(shape=(-1, 3, EVAL_SIZE, EVAL_SIZE), name=INPUT_NAME)
    card = card_fields(onnx_path, spec, name, OUTPUT_NAME)
    card["architecture"] = {"family": "plain-unet", "parameters": sum(p.numel() for p in model.parameters())}
    merge_card(card, extra)
    return write_card(card, onnx_path.with_suffix(".yaml"))


def add_train_parser(subparsers) -> None:
    """`sam2unet train`: train the box-steered model and export it."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="train the bundled box-steered model (or the plain U-Net comparison)",
        description="Train on box crops of real scans, synthetic contrasts and synthetic lesions; "
        "export the best EMA weights to ONNX with a model card.",
    )
    p.add_argument("--arch", choices=("sam2unet", "unet"), default="sam2unet")
    p.add_argument("--config", default="compact", help="SAM2-UNet config (compact, compact_s, ...)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="case folders, folders of them, MSD/nnU-Net datasets (dataset.json) or manifests "
                   "(.yaml/.json with splits); default: the bundled model's manifest")
    p.add_argument("--val-data", nargs="+", default=None, metavar="PATH",
                   help="validation cases, in the same layouts (manifests keep their own splits)")
    add_data_root_argument(p)
    p.add_argument("--out-dir", default="runs/compact", help="checkpoints and log.jsonl")
    p.add_argument("--export", default=None, help="write the best EMA model to this .onnx (+ card)")
    p.add_argument("--name", default=None, help="model name in the card (default: file stem)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--hires-steps", type=int, default=0, help="final steps at 352 px (models without a work size)")
    p.add_argument("--size", type=int, default=192, help="crop size before the final steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hires-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--channels", choices=CHANNEL_MODES, default="multiview",
                   help="multiview: three intensity views; prompted: one view, a prior mask and clicks "
                   "(the model follows corrections; prompt_maps.py)")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="start from these weights: a run's best.pt or an fp32 SAM2-UNet .onnx / card of the "
                   "same config (its stem's views are summed into channel 0 when the channels change)")
    p.add_argument("--click-rounds", type=int, default=2,
                   help="prompted models: up to this many rounds of clicks on the model's own errors per batch")
    p.add_argument("--click-share", type=float, default=0.5,
                   help="prompted models: share of batches that get those rounds")
    p.add_argument("--crop", choices=CROP_MODES, default="box_aspect")
    p.add_argument("--margin", type=float, default=MARGIN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-crops", type=int, default=160)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is present")
    p.add_argument("--workers", type=int, default=1,
                   help="crop-making processes (one makes ~85 crops/s on one core: give a GPU 4-14)")
    p.add_argument("--teacher", default=None, metavar="BEST_PT",
                   help="distil from another run's best.pt (e.g. the plain U-Net's) as well as the labels")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    p.add_argument("--export-only", action="store_true", help="only export OUT_DIR/best.pt")
    p.set_defaults(func=run_train)


def check_args(args) -> None:
    """Every number and output place, in one line each, before any data is read or a step runs."""
    from .. import options as o

    o.check_threads(args.threads, zero_is_default=True)
    for option, value, low in (("--steps", args.steps, 1), ("--batch", args.batch, 1),
                               ("--hires-batch", args.hires_batch, 1), ("--hires-steps", args.hires_steps, 0),
                               ("--size", args.size, 32), ("--warmup", args.warmup, 0),
                               ("--click-rounds", args.click_rounds, 0), ("--val-crops", args.val_crops, 1),
                               ("--val-every", args.val_every, 1), ("--log-every", args.log_every, 1),
                               ("--workers", args.workers, 1)):
        o.check_count(option, value, low)
    o.check_positive("--lr", args.lr)
    for option, value in (("--min-lr", args.min_lr), ("--weight-decay", args.weight_decay),
                          ("--distill-weight", args.distill_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"{option} {value} must be a finite number, 0 or above")
    for option, value in (("--ema", args.ema), ("--click-share", args.click_share)):
        o.check_share(option, value)
    if not (math.isfinite(args.margin) and 0 <= args.margin <= 10):
        raise InputError(f"--margin {args.margin} is a share of the box's side: use 0 to 10")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file; give a folder for the checkpoints and log")
    if not args.export_only:
        o.check_folder_writable(out_dir, "--out-dir")
    if args.export:
        if Path(args.export).suffix != ".onnx":
            raise InputError(f"--export {args.export} must end in .onnx (its card is written beside it)")
        o.check_output_file(Path(args.export), "--export")


def run_train(args) -> int:
    check_args(args)
    require_torch("training", "train")  # one line saying what to install, before modeling imports torch
    if args.arch == "sam2unet":
        from ..modeling.configs import CONFIGS

        if args.config not in CONFIGS:
            raise InputError(f"unknown --config {args.config!r}; use one of {', '.join(CONFIGS)}")
    for what, value in (("--size", args.size),):
        if value % 32:
            raise InputError(f"{what} must be a multiple of 32, got {value}")
    if args.hires_steps > args.steps:
        raise InputError("--hires-steps cannot exceed --steps")
    best = Path(args.out_dir) / "best.pt"
    if not args.export_only:
        best = train(args)
    if args.export:
        if not best.is_file():
            raise InputError(f"no checkpoint {best} to export; train first")
        export(args, best)
    return 0
