"""`sam2unet train --export`: the best EMA weights as ONNX with a model card that says how the
model was trained (settings, data and licence, the validation Dice of the chosen step)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from ..errors import InputError
from ..prompt_maps import PROMPTED
from .cards import export_model, input_fields
from .train_model import EVAL_SIZE, build_model
from .train_settings import TrainSettings, training_cases

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


# A prompted model is handed the neighbouring slice's mask at this weight when propagating: at
# 1.0 it copied the prior past the structure's end; 0.25 was chosen on validation (2026-12-03,
# docs/performance.md). The card says it, so an exported model propagates as the bundled one.
PROPAGATION_PRIOR = 0.25

# What a prompted card says its input channels hold (prompt_maps.py draws them).
PROMPT_CARD = {
    "channel_0": "the intensity window (CT preset or MR percentiles), the crop resized to the input",
    "channel_1": "prior mask, 0..1, in the crop's frame: the neighbouring slice's mask when propagating or "
                 "interpolating (drawn at propagation_prior), the current mask when correcting; 0 for a box alone",
    "channel_2": "clicks: 0.5 where there is none, a Gaussian (sigma 0.02 of the input side) up to 1 at a "
                 "positive click and down to 0 at a negative one",
    "normalisation": "each channel like an image channel: x * scale (0..255 -> 0..1), minus mean, over std",
    "box": "the crop itself: the box plus the card's margin, resized to the input",
}


def _wrong_objects(share: float) -> str:
    if not share:
        return ""
    return (f"{share:.0%} of correct crops have the wrong structure as the prior (another structure of the "
            "label map beside the target, now and then with the target's core) and 1-3 clicks on its errors, "
            "and a ring's flawed prior is as often its hole. ")


def simulated_users(settings: TrainSettings) -> str:
    """How a prompted model's training crops prompt it, for the card (data.py, click_rounds)."""
    from .data import PAST_END_SHARE, PROMPT_MODE_SHARES, PROMPT_MODES

    shares = ", ".join(f"{mode} {share:.0%}" for mode, share in zip(PROMPT_MODES, PROMPT_MODE_SHARES))
    low, high = settings.click_crop_extent
    return (f"crops by prompt: {shares}. box: a jittered box alone; propagate: the box of a slice 1-3 away and "
            f"its mask (shifted, grown or shrunk) as the prior, {PAST_END_SHARE:.0%} of them past the structure's "
            "end (the target empty); correct: a flawed prior (eroded, dilated, cut, leaking, smoothed) and 0-3 "
            "clicks on its errors; clicks: 1-3 positive and 0-2 negative clicks near the structure in a crop "
            f"{low:g}-{high:g}x its extent. {_wrong_objects(settings.wrong_object_share)}"
            f"Then {settings.click_share:.0%} of batches get "
            f"1-{settings.click_rounds} rounds of a click on the model's own largest error with its mask as the "
            "prior, as users correct")


def card_extra(settings: TrainSettings, best_state, trained_steps: int | None = None) -> dict:
    """What the card says about the model's input and training (metrics are added by eval)."""
    splits = training_cases(settings)
    steps = {"steps": trained_steps or settings.steps}
    if trained_steps and trained_steps != settings.steps:
        steps["schedule_steps"] = settings.steps  # stopped before its schedule ended (then resumed or not)
    outputs = "all three outputs" if settings.arch == "sam2unet" else "its one output"
    return {
        "input": input_fields(settings),
        "licence": weights_licence(splits["train"]),
        "task": ("class-agnostic segmentation of one structure on an MRI or CT slice, steered by a box, clicks "
                 "and a prior mask in its input channels" if settings.channels == PROMPTED else
                 "class-agnostic box-steered segmentation of one structure per box on an MRI or CT slice"),
        **({"propagation_prior": PROPAGATION_PRIOR, "prompts": PROMPT_CARD} if settings.channels == PROMPTED else {}),
        "training": {
            "command": settings.command_line,
            "seed": settings.seed,
            **steps,
            "chosen_step": int(best_state.get("step", settings.steps)),
            "validation_dice": round(float(best_state.get("val_dice", float("nan"))), 4),
            "resolution": (f"{settings.size}px crops, batch {settings.batch}"
                           + (f"; then {settings.hires_steps} steps at {EVAL_SIZE}px, batch {settings.hires_batch}"
                              if settings.hires_steps else "")),
            "loss": f"weighted BCE + weighted IoU on {outputs}"
            + (f" + {settings.distill_weight} x BCE against the teacher's probabilities" if settings.teacher else ""),
            **({"teacher": str(settings.teacher)} if settings.teacher else {}),
            **({"initialised_from": str(settings.init)} if settings.init else {}),
            **({"simulated_users": simulated_users(settings)} if settings.channels == PROMPTED else {}),
            "ema_decay": settings.ema,
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


def _training_settings(settings: TrainSettings, state: dict) -> TrainSettings:
    """The run's last settings (architecture, steps, command) with this call's export target.

    `--export-only` may be called without repeating the training options: the model must be
    built, and its card written, from what the checkpoint was trained with.
    """
    this_call = {"export", "name", "export_only", "out_dir", "data_root", "threads", "cpu"}
    known = {f.name for f in fields(TrainSettings)} - this_call
    return replace(settings, **{k: v for k, v in (state.get("args") or {}).items() if k in known})


def export(settings: TrainSettings, best_path: Path) -> Path:
    """Export the best EMA weights: ONNX + model card."""
    from .checkpoint_file import load_checkpoint

    state = load_checkpoint(best_path, "--export")  # weights only: a pickle cannot run code
    if "ema" not in state:
        raise InputError(f"{best_path} is not a best.pt written by `sam2unet train`")
    trained_steps = None
    if settings.export_only:
        last = best_path.with_name("last.pt")
        run_state = load_checkpoint(last, "--export-only") if last.is_file() else state
        settings = _training_settings(settings, run_state)
        trained_steps = run_state.get("step")
    model = build_model(settings.arch, settings.config)
    model.load_state_dict(state["ema"])
    model.eval()
    onnx_path = Path(settings.export)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    extra = card_extra(settings, state, trained_steps)
    card = export_model(model, onnx_path, settings.config if settings.arch == "sam2unet" else None, extra,
                        settings.name)
    print(f"wrote {onnx_path} and {card}", flush=True)
    return card
