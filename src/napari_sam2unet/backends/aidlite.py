"""Qualcomm NPU backend: QNN context binaries (.bin) run through APLUX AidLite's `aidlite` module.

`aidlite` exists only on the device (installed with AidLite, not on PyPI), so it is imported
lazily and every call into it is checked: AidLite reports failures as non-zero return codes
or None, never as exceptions, and a silent failure would return garbage masks.
Choosing the binary, checking it and quantised I/O are shared with the QNN backend
(qnn_binary.py).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np

from ..errors import BackendError
from ..models import ModelCard, NpuBinary
from .base import Backend, checked_batch
from .qnn_binary import DOCS as _DOCS
from .qnn_binary import DTYPES, chosen_binary, dequantise, detect_soc, quantise, select_binary

__all__ = ["AidliteBackend", "DTYPES", "detect_soc", "npu_unavailable_reason", "select_binary"]


def _missing_aidlite(binary: NpuBinary | None) -> str:
    """What is missing and how to get it: `aidlite` is not on PyPI."""
    qnn = _qnn_package(binary)
    which = " (XYZ: the QNN version of your .bin)" if qnn.endswith("XYZ") else ""
    return (
        "the Python module `aidlite` is not installed (it ships with APLUX AidLite on "
        f"Qualcomm devices, not on PyPI); on the device run `sudo aid-pkg install aidlite-sdk "
        f"{qnn}`{which} and use a Python that sees the system packages ({_DOCS}), "
        "or use --backend cpu"
    )


def _qnn_package(binary: NpuBinary | None) -> str:
    """The AidLite QNN runtime package matching a binary, e.g. aidlite-qnn223."""
    digits = ""
    if binary is not None:
        match = re.fullmatch(r"TYPE_QNN(\d+)", binary.framework)
        digits = match.group(1) if match else binary.qnn_version.replace(".", "")[:3]
    return f"aidlite-qnn{digits or 'XYZ'}"


def npu_unavailable_reason(card: ModelCard) -> str | None:
    """None when the NPU can run this card, else all that is missing, in the user's terms."""
    reasons = []
    binary = None
    if not card.npu:
        reasons.append(f"model {card.name} has no QNN context binary (.bin) in its card ({_DOCS})")
    else:
        binary, _ = select_binary(card)
        if not binary.file.is_file():
            reasons.append(f"its QNN context binary {binary.file} is missing")
    try:
        import aidlite  # noqa: F401
    except ImportError as error:
        if getattr(error, "name", None) == "aidlite":
            reasons.insert(0, _missing_aidlite(binary))
        else:  # installed but broken, e.g. libaidlite.so not found
            reasons.insert(
                0,
                f"the `aidlite` module is installed but does not import ({error}); reinstall aidlite-sdk ({_DOCS})",
            )
    return "; ".join(reasons) or None


class AidliteBackend(Backend):
    """Runs a card's QNN context binary on the NPU (DSP/HTP) through AidLite, a slice at a time."""

    name = "npu"

    def __init__(self, card: ModelCard, binary: NpuBinary | None = None, soc: str | None = None):
        super().__init__(card)
        binary, self.choice = chosen_binary(card, binary, soc)
        self.binary = binary
        try:
            import aidlite
        except ImportError as error:
            if getattr(error, "name", None) == "aidlite":
                raise BackendError(f"the NPU backend cannot run: {_missing_aidlite(binary)}") from None
            raise BackendError(
                f"the `aidlite` module is installed but does not import ({error}); reinstall aidlite-sdk ({_DOCS})"
            ) from None
        self._aidlite = aidlite
        self._interpreter: Any = None
        # One interpreter, one image at a time: a second caller (another widget run) waits.
        self._lock = threading.Lock()
        height, width = card.input.size
        self._size = (height, width)
        self._out_dtype = np.dtype(DTYPES[binary.output_dtype])
        if binary.layout == "nhwc":
            self._in_shape, self._out_shape = [1, height, width, 3], [1, height, width, 1]
        else:
            self._in_shape, self._out_shape = [1, 3, height, width], [1, 1, height, width]
        self._open()

    # -- checks and set-up ------------------------------------------------------------------

    def _enum(self, kind: str, name: str, hint: str) -> Any:
        members = getattr(self._aidlite, kind)
        value = getattr(members, name, None)
        if value is None:
            known = sorted(n for n in dir(members) if n.startswith("TYPE_"))
            raise BackendError(f"this AidLite has no {kind}.{name} ({hint}); it offers {', '.join(known) or 'none'}")
        return value

    def _open(self) -> None:
        aidlite, binary = self._aidlite, self.binary
        qnn = _qnn_package(binary)
        config = aidlite.Config.create_instance()
        if config is None:
            raise BackendError(f"AidLite could not create a Config; reinstall aidlite-sdk ({_DOCS})")
        config.implement_type = self._enum("ImplementType", "TYPE_LOCAL", "update aidlite-sdk")
        config.framework_type = self._enum(
            "FrameworkType",
            binary.framework,
            f"the card's binary needs it: install {qnn}, or convert for the QNN version this device has",
        )
        config.accelerate_type = self._enum("AccelerateType", "TYPE_DSP", "update aidlite-sdk")
        # A hint some AidLite versions read; quantised I/O is converted here either way.
        config.is_quantify_model = int(binary.input_dtype != "float32")

        model = aidlite.Model.create_instance(str(binary.file))
        if model is None:
            raise BackendError(f"AidLite could not open {binary.file} (unreadable or not a model file)")
        in_type = self._enum("DataType", f"TYPE_{binary.input_dtype.upper()}", "update aidlite-sdk")
        out_type = self._enum("DataType", f"TYPE_{binary.output_dtype.upper()}", "update aidlite-sdk")
        code = model.set_model_properties([self._in_shape], in_type, [self._out_shape], out_type)
        if isinstance(code, int) and code != 0:
            raise BackendError(f"AidLite set_model_properties failed with code {code} for {binary.file.name}")

        # AidLite releases spell it both ways: prefer the corrected name.
        builder = aidlite.InterpreterBuilder
        build = getattr(builder, "build_interpreter_from_model_and_config", None) or getattr(
            builder, "build_interpretper_from_model_and_config", None
        )
        if build is None:
            raise BackendError(
                f"this aidlite module has no "
                "InterpreterBuilder.build_interpreter_from_model_and_config; "
                f"update aidlite-sdk ({_DOCS})"
            )
        self._interpreter = build(model, config)
        if self._interpreter is None:
            raise BackendError(
                f"AidLite could not build an interpreter for {binary.file.name} "
                f"({binary.framework} on the DSP); "
                f"check that {qnn} is installed ({_DOCS})"
            )
        made_for = f"built for {binary.soc or 'an unnamed SoC'} with QNN {binary.qnn_version or '?'}"
        self._step(
            "init",
            f"likely causes: the QNN runtime for {binary.framework} is not installed (sudo "
            f"aid-pkg install {qnn}), "
            f"or the DSP libraries (fastrpc/cDSP) are missing or not accessible to this user",
        )
        self._step(
            "load_model",
            f"the binary is {made_for}: it must match this device's SoC and the installed QNN "
            "version, and its "
            f"input must be {'x'.join(map(str, self._in_shape))} {binary.input_dtype} "
            f"({binary.layout}); "
            f"reconvert it for this device or fix the card's npu entry",
        )

    def _step(self, step: str, causes: str) -> None:
        code = getattr(self._interpreter, step)()
        if code != 0:
            self.close()
            raise BackendError(
                f"AidLite {step}() failed with code {code} for {self.binary.file.name}: {causes} ({_DOCS})"
            )

    # -- the Backend interface ----------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return 1  # AidLite runs one image per invoke(); bigger batches are looped anyway

    @property
    def device(self) -> str:
        version = ""
        if hasattr(self._aidlite, "get_library_version"):
            try:
                version = f" {self._aidlite.get_library_version()}"
            except Exception:  # a version string is decoration, never a failure
                version = ""
        soc = f", {self.binary.soc}" if self.binary.soc else ""
        binary = self.binary
        io = binary.input_dtype
        return f"Qualcomm NPU via AidLite{version} ({binary.framework}, DSP{soc}, {io} I/O)"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self._interpreter is None:
            raise BackendError("the NPU backend was closed; open it again")
        batch = checked_batch(batch, self._size, "NPU")
        height, width = self._size
        out = np.empty((batch.shape[0], 1, height, width), dtype=np.float32)
        with self._lock:
            for index, image in enumerate(batch):
                out[index, 0] = self._run_one(image, index, batch.shape[0]).reshape(height, width)
        return out

    def _run_one(self, image: np.ndarray, index: int, count: int) -> np.ndarray:
        if self._interpreter is None:
            raise BackendError("the NPU backend was closed; open it again")
        if self.binary.layout == "nhwc":
            image = image.transpose(1, 2, 0)
        tensor = np.ascontiguousarray(quantise(image[None], self.binary))
        code = self._interpreter.set_input_tensor(0, tensor)
        if code not in (0, None):
            raise BackendError(
                f"AidLite set_input_tensor() failed with code {code}: the binary does not take "
                f"{'x'.join(map(str, tensor.shape))} {tensor.dtype}; check the card's npu "
                "layout and input_dtype"
            )
        code = self._interpreter.invoke()
        if code != 0:
            raise BackendError(
                f"AidLite invoke() failed with code {code} on slice {index + 1} of {count}: "
                f"the NPU did not run the model (busy, out of memory or reset); retry, or use "
                "--backend cpu"
            )
        return self._read_output()

    def _read_output(self) -> np.ndarray:
        raw = self._interpreter.get_output_tensor(0)
        if raw is None:
            raise BackendError(
                "AidLite get_output_tensor(0) returned nothing after a successful invoke(); update aidlite-sdk"
            )
        raw = np.asarray(raw).reshape(-1)
        count = self._size[0] * self._size[1]
        dtype = self._out_dtype
        if raw.dtype != dtype and raw.nbytes == count * dtype.itemsize and raw.size != count:
            raw = raw.view(dtype)  # a raw byte buffer of the declared type
        if raw.size != count:
            raise BackendError(
                f"AidLite returned {raw.size} output values, expected {count} "
                f"({'x'.join(map(str, self._out_shape))}); the binary's output does not match the "
                "card"
            )
        # Float values are logits already (AidLite may dequantise itself).
        return dequantise(raw, self.binary)

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before the interpreter existed
            return
        with lock:
            interpreter, self._interpreter = self._interpreter, None
        if interpreter is None:
            return
        # Older AidLite spells it destory().
        release = getattr(interpreter, "destroy", None) or getattr(interpreter, "destory", None)
        if release is not None:
            release()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # never raise from a finaliser
            pass
