"""Load SAM2-UNet weights strictly, or start the trunk from a SAM2 checkpoint.

Every refusal is a ModelError that names the mismatch (missing keys, unexpected keys,
shapes that differ) and what to do about it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelError, require_torch

SHOW = 5  # how many keys an error message lists
SAM2_TRUNK_PREFIX = "image_encoder.trunk."
# Keys that only SAM2.1 checkpoints carry (its memory/object-pointer changes).
SAM21_MARKERS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias")
WRAPPERS = ("model", "state_dict", "model_state_dict", "net")


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read a .pt/.pth file safely (weights only) and return its top-level mapping."""
    torch = require_torch("loading checkpoints (.pt/.pth)")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zips, pickles with code, random bytes...
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise ModelError(
            f"checkpoint {path.name} cannot be read ({reason}); it may be truncated or not a "
            f"PyTorch state dict: download it again and compare its size and sha256"
        ) from None
    if not isinstance(data, Mapping):
        raise ModelError(
            f"checkpoint {path.name} holds a {type(data).__name__}, not a state dict; "
            f"save it with torch.save(model.state_dict(), path)"
        )
    return data


def unwrap(data: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict inside a checkpoint: plain, or under 'model' / 'state_dict'; drops a
    DataParallel 'module.' prefix."""
    for key in WRAPPERS:
        inner = data.get(key)
        if isinstance(inner, Mapping) and inner:
            data = inner
            break
    state = dict(data)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def is_sam21(state: Mapping[str, Any]) -> bool:
    return any(marker in state for marker in SAM21_MARKERS)


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a config's state dict, without allocating weights."""
    torch = require_torch("loading checkpoints (.pt/.pth)")
    from ..modeling import Sam2Unet

    with torch.device("meta"):
        model = Sam2Unet(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if hasattr(value, "shape") else None


def describe_mismatch(
    state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: file a vs model b' shape differences)."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    differ = [
        f"{key}: file {list(_shape(state[key]) or [])} vs model {list(expected[key])}"
        for key in expected
        if key in state and _shape(state[key]) != expected[key]
    ]
    return missing, unexpected, differ


def _first(items: list[str]) -> str:
    more = f" (+{len(items) - SHOW} more)" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


def guess_config(state: Mapping[str, Any]) -> str | None:
    """The config whose names and shapes the state dict matches exactly, if any."""
    from ..modeling import CONFIGS

    for name, config in CONFIGS.items():
        missing, unexpected, differ = describe_mismatch(state, _expected_shapes(config))
        if not (missing or unexpected or differ):
            return name
    return None


def check_state_dict(state: Mapping[str, Any], config, source: str = "checkpoint") -> None:
    """Raise a ModelError naming every kind of mismatch between `state` and `config`."""
    if any(key.startswith(SAM2_TRUNK_PREFIX) for key in state):
        version = "SAM2.1" if is_sam21(state) else "SAM2"
        raise ModelError(
            f"{source} is a {version} checkpoint (image_encoder.trunk.*), not a SAM2-UNet one; "
            f"train or download SAM2-UNet weights, or start a model's trunk from it with "
            f"load_sam2_trunk()"
        )
    expected = _expected_shapes(config)
    missing, unexpected, differ = describe_mismatch(state, expected)
    if not (missing or unexpected or differ):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if differ:
        parts.append(f"{len(differ)} shapes differ: {_first(differ)}")
    hint = "check that the file is a complete SAM2-UNet state dict"
    matched = len(expected) - len(missing)
    if matched < len(expected) // 2:
        hint = "it does not look like a SAM2-UNet checkpoint (another architecture?)"
    if differ or (missing and unexpected):
        other = guess_config(state)
        if other and other != config.name:
            hint = f"it fits config {other!r}: pass --config {other}"
    raise ModelError(f"{source} does not fit SAM2-UNet config {config.name!r}: {'; '.join(parts)}; {hint}")


def load_sam2unet(checkpoint: str | os.PathLike | Mapping[str, Any], config="large"):
    """A Sam2Unet in eval mode with the weights of a SAM2-UNet checkpoint, loaded strictly.

    `checkpoint` is a path or an already loaded mapping; wrapped state dicts are unwrapped.
    """
    from ..modeling import Sam2Unet, get_config

    config = get_config(config)
    if isinstance(checkpoint, Mapping):
        data, source = checkpoint, "state dict"
    else:
        data, source = read_checkpoint(checkpoint), f"checkpoint {Path(checkpoint).name}"
    state = unwrap(data)
    check_state_dict(state, config, source)  # before allocating a large model
    model = Sam2Unet(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def sam2_trunk_state(data: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """Our encoder's names for the trunk weights in a SAM2 checkpoint (adapters excluded)."""
    state = dict(data.get("model", data)) if isinstance(data, Mapping) else {}
    if is_sam21(state):
        raise ModelError(
            f"{source} is a SAM2.1 checkpoint; SAM2-UNet is built on SAM2 (not 2.1) trunks: "
            f"use sam2_hiera_*.pt from the original SAM2 release"
        )
    trunk = {}
    for key, value in state.items():
        if not key.startswith(SAM2_TRUNK_PREFIX):
            continue
        name = key[len(SAM2_TRUNK_PREFIX) :]
        if name.startswith("blocks."):
            index, rest = name[len("blocks.") :].split(".", 1)
            name = f"blocks.{index}.block.{rest}"
        trunk[name] = value
    if not trunk:
        first = _first(list(state)) or "nothing"
        raise ModelError(
            f"{source} has no SAM2 trunk weights (image_encoder.trunk.*); it starts with "
            f"{first}: pass a sam2_hiera_*.pt checkpoint"
        )
    return trunk


def load_sam2_trunk(model, checkpoint: str | os.PathLike | Mapping[str, Any]) -> None:
    """Initialise `model.encoder` from a SAM2 checkpoint; adapters and decoder keep their init."""
    if isinstance(checkpoint, Mapping):
        data, source = checkpoint, "state dict"
    else:
        data, source = read_checkpoint(checkpoint), f"checkpoint {Path(checkpoint).name}"
    trunk = sam2_trunk_state(data, source)
    expected = {
        key: tuple(value.shape) for key, value in model.encoder.state_dict().items() if ".prompt_learn." not in key
    }
    missing, unexpected, differ = describe_mismatch(trunk, expected)
    if missing or unexpected or differ:
        parts = [
            f"{len(items)} {what}: {_first(items)}"
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shapes differ", differ),
            )
            if items
        ]
        hint = model.config.sam2_trunk or "the SAM2 checkpoint of the same size"
        raise ModelError(f"{source} trunk does not fit config {model.config.name!r}: {'; '.join(parts)}; use {hint}")
    model.encoder.load_state_dict(trunk, strict=False)
