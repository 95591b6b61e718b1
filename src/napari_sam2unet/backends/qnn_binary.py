"""QNN context binaries as a model card lists them: which one for this SoC, checks, quantised I/O.

Shared by both NPU backends (AidLite and onnxruntime's QNN execution provider): they run the
same .bin. Quantised I/O follows QNN's convention, which the card copies from the build:
real = (q + offset) * scale, so offset is usually negative (-32768 for a symmetric uint16
tensor). The opposite "zero point" convention is real = (q - zero_point) * scale, i.e.
offset = -zero_point.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..models import ModelCard, NpuBinary, verify_file

# Overrides SoC detection, e.g. SAM2UNET_NPU_SOC=QCS6490 (also the way to pick a binary on a
# board whose SoC name the kernel does not expose).
SOC_ENV = "SAM2UNET_NPU_SOC"
DTYPES: dict[str, type] = {
    "float32": np.float32,
    "uint8": np.uint8,
    "int8": np.int8,
    "uint16": np.uint16,
    "int16": np.int16,
}
# Where Linux on Qualcomm boards names the SoC (first readable wins).
_SOC_FILES = (
    "/sys/devices/soc0/machine",
    "/proc/device-tree/compatible",
    "/proc/device-tree/model",
)
DOCS = "see docs/npu.md"


def norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def same_soc(a: str, b: str) -> bool:
    """True when two SoC names mean one chip (QCS/QCM variants of one number share the NPU)."""
    if not a or not b:
        return False
    if norm(a) in norm(b) or norm(b) in norm(a):
        return True
    digits = re.sub(r"\D", "", a)
    return bool(digits) and digits in re.sub(r"\D", " ", b).split()


def detect_soc() -> str | None:
    """This device's Qualcomm SoC as the kernel names it (e.g. 'qcom,qcs8550'), or None."""
    if os.environ.get(SOC_ENV):
        return os.environ[SOC_ENV]
    for path in _SOC_FILES:
        try:
            text = Path(path).read_bytes().replace(b"\0", b" ").decode(errors="ignore").strip()
        except OSError:
            continue
        if text:
            return text
    return None


def select_binary(card: ModelCard, soc: str | None = None) -> tuple[NpuBinary, str]:
    """The card's .bin for this device's SoC, else the first; with a few words saying which."""
    if not card.npu:
        raise ModelError(f"model {card.name} has no QNN context binary (.bin) in its card ({DOCS})")
    soc = soc if soc is not None else detect_soc()
    if soc:
        found = norm(soc)
        for binary in card.npu:
            if binary.soc and norm(binary.soc) in found:
                return binary, f"built for {binary.soc}, this device's SoC"
        for binary in card.npu:
            number = re.sub(r"\D", "", binary.soc)
            if number and number in re.sub(r"\D", " ", soc).split():
                return binary, f"built for {binary.soc}, same chip family as this device"
        return (
            card.npu[0],
            f"no binary for this SoC ({soc.strip()[:40]}); trying the first, built for "
            f"{card.npu[0].soc or 'an unnamed SoC'}",
        )
    first = card.npu[0]
    return (
        first,
        f"SoC not detected; using the first binary, built for {first.soc or 'an unnamed SoC'}",
    )


def chosen_binary(card: ModelCard, binary: NpuBinary | None, soc: str | None = None) -> tuple[NpuBinary, str]:
    """The caller's binary, else the card's for the SoC (select_binary), checked (check_binary);
    with a few words saying which."""
    binary, choice = (binary, "chosen by the caller") if binary is not None else select_binary(card, soc)
    check_binary(card, binary)
    return binary, choice


def check_binary(card: ModelCard, binary: NpuBinary) -> None:
    """The card's npu entry is usable and the file is the one it describes (ModelError if not)."""
    where = f"model card of {card.name}"
    if binary.layout not in ("nchw", "nhwc"):
        raise ModelError(f"{where}: npu layout is {binary.layout!r}; use nhwc (AIMO's usual) or nchw")
    for what in ("input", "output"):
        dtype, scale = getattr(binary, f"{what}_dtype"), getattr(binary, f"{what}_scale")
        if dtype not in DTYPES:
            raise ModelError(f"{where}: npu {what}_dtype is {dtype!r}; use one of {', '.join(DTYPES)}")
        if dtype != "float32" and not float(scale) > 0:
            raise ModelError(
                f"{where}: npu {what}_scale must be > 0 for {dtype} I/O (copy it from the converter's output)"
            )
    verify_file(binary.file, binary.sha256, "QNN context binary",
                f"convert the model for the NPU ({DOCS}) or remove its npu entry from the card",
                "copy it again or update the card")


def quantise(values: np.ndarray, binary: NpuBinary) -> np.ndarray:
    """Float input -> the binary's input codes (float32 passes through)."""
    dtype = np.dtype(DTYPES[binary.input_dtype])
    if dtype == np.float32:
        return values.astype(np.float32, copy=False)
    info = np.iinfo(dtype)
    # QNN: real = (q + offset) * scale  =>  q = round(real / scale - offset), saturated.
    codes = np.rint(values / np.float32(binary.input_scale) - np.float32(binary.input_offset))
    return np.clip(codes, info.min, info.max).astype(dtype)


def dequantise(raw: np.ndarray, binary: NpuBinary) -> np.ndarray:
    """The binary's output codes -> float logits (float values are logits already)."""
    if binary.output_dtype == "float32" or raw.dtype.kind == "f":
        return raw.astype(np.float32, copy=False)
    return (raw.astype(np.float32) + np.float32(binary.output_offset)) * np.float32(binary.output_scale)
