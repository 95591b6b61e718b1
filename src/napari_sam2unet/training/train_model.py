"""The models `sam2unet train` builds and how it scores them: losses, the weights' moving average
(EMA), validation Dice, starting weights, and the corrective clicks of interactive training.
torch is imported only when one of these runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, require_torch
from ..models import INPUT_SIZE, InputSpec
from ..prompt_maps import PROMPTED

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
            # BatchNorm statistics are averaged too: the live model's statistics belong to the
            # live weights, and with averaged weights they broke validation now and then.
            averaged, live = [], []
            for e, b in zip(self.model.buffers(), model.buffers()):
                if e.dtype.is_floating_point:
                    averaged.append(e)
                    live.append(b.detach())
                else:
                    e.copy_(b)
            averaged += list(self.model.parameters())
            live += [p.detach() for p in model.parameters()]
            # One call for all tensors: a GPU step spent a third of its time on one call per tensor.
            torch._foreach_lerp_(averaged, live, 1 - d)


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

