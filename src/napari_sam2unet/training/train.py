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
from pathlib import Path

import numpy as np

from ..errors import InputError, require_torch
from ..models import InputSpec

EVAL_SIZE = 352  # the model contract; validation always runs at this size


def structure_loss(pred, mask):
    """Weighted BCE + weighted IoU, pixels near edges weighted up (as SAM2-UNet upstream)."""
    torch = require_torch("training", "train")
    F = torch.nn.functional
    size = mask.shape[-1]
    k = max(3, int(round(31 * size / 352)) | 1)
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
    torch = require_torch("training", "train")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; give a run's best.pt")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception:  # torch raises several kinds for files it cannot read
        state = None
    if not isinstance(state, dict) or "ema" not in state or "args" not in state:
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
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    spec = input_spec(args)
    splits = training_cases(args)
    # Read every training case once here: a bad file stops the run with its name, before any
    # step (the crop stream reads them again in its own process).
    tdata.load_sources(splits["train"])
    model = build_model(args.arch, args.config).to(device)
    ema = Ema(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, best, history = 0, -1.0, []
    last_path, best_path = out / "last.pt", out / "best.pt"
    if args.resume and last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        opt.load_state_dict(state["opt"])
        step, best, history = state["step"], state["best"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {last_path} at step {step}", flush=True)
    elif args.resume:
        print(f"--resume: no checkpoint in {out}, starting from scratch", flush=True)
    elif last_path.is_file():
        # A fresh run would overwrite that run's checkpoints and mix into its log.
        raise InputError(
            f"{out} already holds a training run ({last_path.name}); pass --resume to continue it "
            "or choose another --out-dir"
        )
    teacher = load_teacher(args.teacher, device) if args.teacher else None
    vx, vy = tdata.validation_set(spec, (EVAL_SIZE, EVAL_SIZE), splits["validation"], n=args.val_crops)
    _drop_log_after(out / "log.jsonl", step)
    log = open(out / "log.jsonl", "a")

    def save(path):
        _save_atomic(torch, {
            "model": model.state_dict(), "ema": ema.model.state_dict(), "ema_updates": ema.updates,
            "opt": opt.state_dict(), "step": step, "best": best, "history": history,
            "torch_rng": torch.get_rng_state(), "args": saved_args(args),
        }, path)

    stream, stream_phase = None, None
    start, seen, t_last = time.time(), 0, time.time()
    losses = []
    try:
        while step < args.steps:
            phase = _phase(step, args)
            if phase != stream_phase:
                if stream:
                    stream.close()
                # The data stream is seeded by (seed, step): a resumed run is reproducible too.
                stream = tdata.CropStream(args.seed * 100003 + step, spec, (phase[0],) * 2, phase[1], splits["train"])
                stream_phase = phase
            x, y = stream.get()
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            for group in opt.param_groups:
                group["lr"] = _lr(step, args)
            model.train()
            # The plain U-Net returns its one map three times; SAM2-UNet's three heads all learn.
            outs = model(x)[: 1 if args.arch == "unet" else 3]
            loss = sum(structure_loss(o, y) for o in outs)
            if teacher is not None:
                loss = loss + args.distill_weight * distill_loss(teacher, x, outs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema.update(model)
            step += 1
            seen += x.shape[0]
            losses.append(loss.item())
            validate = step % args.val_every == 0 or step == args.steps
            if step % args.log_every == 0 or validate:
                now = time.time()
                rate = seen / (now - t_last)
                elapsed = now - start
                line = {
                    "step": step, "size": phase[0], "loss": float(np.mean(losses)),
                    "lr": _lr(step - 1, args), "crops_per_s": round(rate, 1), "elapsed_s": round(elapsed),
                }
                losses, seen, t_last = [], 0, now
                if validate:
                    line["val_dice"] = dice_scores(ema.model, vx, vy, device)
                    if line["val_dice"] > best:
                        best = line["val_dice"]
                        _save_atomic(torch, {"ema": ema.model.state_dict(), "step": step, "val_dice": best,
                                             "args": saved_args(args)}, best_path)
                    save(last_path)
                history.append(line)
                log.write(json.dumps(line) + "\n")
                log.flush()
                val = f" val Dice {line['val_dice']:.3f} (best {best:.3f})" if "val_dice" in line else ""
                print(
                    f"step {step}/{args.steps} {phase[0]}px loss {line['loss']:.3f} "
                    f"{rate:.1f} crops/s {elapsed / 60:.1f} min{val}",
                    flush=True,
                )
    finally:
        if stream:
            stream.close()
        log.close()
    save(last_path)
    return best_path


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
    from .data import split_cases
    from .datasets import default_manifest, find_cases

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


def card_extra(args, best_state) -> dict:
    """What the card says about the model's input and training (metrics are added by eval)."""
    return {
        "input": {"channels": args.channels, "crop": args.crop, "margin": args.margin},
        "threshold": 0.5,
        "licence": "Apache-2.0",
        "task": "class-agnostic box-steered segmentation of one structure per box on an MRI or CT slice",
        "training": {
            "command": args.command_line,
            "seed": args.seed,
            "steps": args.steps,
            "chosen_step": int(best_state.get("step", args.steps)),
            "validation_dice": round(float(best_state.get("val_dice", float("nan"))), 4),
            "resolution": (f"{args.size}px crops, batch {args.batch}"
                           + (f"; then {args.hires_steps} steps at {EVAL_SIZE}px, batch {args.hires_batch}"
                              if args.hires_steps else "")),
            "loss": "weighted BCE + weighted IoU on all three outputs"
            + (f" + {args.distill_weight} x BCE against the teacher's probabilities" if args.teacher else ""),
            **({"teacher": str(args.teacher)} if args.teacher else {}),
            "ema_decay": args.ema,
        },
        "data": training_data_note(training_cases(args)),
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
    torch = require_torch("training", "train")
    state = torch.load(best_path, map_location="cpu", weights_only=False)
    if args.export_only:
        last = best_path.with_name("last.pt")
        run_state = torch.load(last, map_location="cpu", weights_only=False) if last.is_file() else state
        args = _training_args(args, run_state)
    model = build_model(args.arch, args.config)
    model.load_state_dict(state["ema"])
    model.eval()
    onnx_path = Path(args.export)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    extra = card_extra(args, state)
    if args.arch == "sam2unet":
        from ..export import export_onnx

        card = export_onnx(model, onnx_path, args.config, card_extra=extra, name=args.name)
    else:
        card = export_plain(model, onnx_path, extra, args.name)
    print(f"wrote {onnx_path} and {card}", flush=True)
    return card


def export_plain(model, onnx_path: Path, extra: dict, name: str | None) -> Path:
    """Export a plain torch model (first output only) with a card."""
    from ..export import _first_logits_module, _merge, trace_onnx
    from ..models import IMAGENET_MEAN, IMAGENET_STD, sha256_file, write_card

    trace_onnx(_first_logits_module(model, "nchw").eval(), onnx_path)
    card = {
        "name": name or onnx_path.stem,
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "input": {"shape": [-1, 3, EVAL_SIZE, EVAL_SIZE], "layout": "nchw", "name": "image",
                  "scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "output": {"name": "logits", "shape": [-1, 1, EVAL_SIZE, EVAL_SIZE]},
        "architecture": {"family": "plain-unet", "parameters": sum(p.numel() for p in model.parameters())},
    }
    _merge(card, extra)
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
    p.add_argument("--data-root", default=os.environ.get("SAM2UNET_DATA"),
                   help="the folder a manifest's paths are relative to (default: $SAM2UNET_DATA)")
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
    p.add_argument("--channels", choices=("replicate", "multiview"), default="multiview")
    p.add_argument("--crop", choices=("square", "box_aspect"), default="box_aspect")
    p.add_argument("--margin", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-crops", type=int, default=160)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is present")
    p.add_argument("--teacher", default=None, metavar="BEST_PT",
                   help="distil from another run's best.pt (e.g. the plain U-Net's) as well as the labels")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    p.add_argument("--export-only", action="store_true", help="only export OUT_DIR/best.pt")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
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
