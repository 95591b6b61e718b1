"""Reading a .pt file as data only: torch's weights-only unpickler, so a file cannot run code.

A pickle can call any function while it is loaded; every checkpoint a user passes (`finetune
--base`, `train --teacher`, `--resume`, `--export-only`) is read here, where only tensors and
plain values (dicts, lists, numbers, strings) are accepted.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

from ..errors import InputError, require_torch


def load_checkpoint(path: str | os.PathLike, what: str, device="cpu") -> dict:
    """The mapping a .pt file holds, or one InputError line naming `what` (the option given)."""
    torch = require_torch("reading checkpoints", "train")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise InputError(
                f"{what} {path} holds {found.group(1)}, not only tensors and plain values (loading it "
                "could run code): refused; save a state dict or a `sam2unet train` checkpoint"
            ) from None
        raise InputError(f"{what} {path} is not a PyTorch checkpoint (it cannot be read as data)") from None
    except Exception:  # empty, text, a truncated zip: torch raises several kinds
        raise InputError(f"{what} {path} is not a PyTorch checkpoint (empty, truncated or another format)") from None
    if not isinstance(state, dict):
        raise InputError(f"{what} {path} holds a {type(state).__name__}, not a state dict or checkpoint")
    return state
