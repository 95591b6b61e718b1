"""Qualcomm's QNN runtime as the onnxruntime-qnn wheel ships it: finding it, its versions, the HTP.

onnxruntime-qnn (2.x) is a plugin execution provider for the ordinary onnxruntime package: it
installs its own `onnxruntime_qnn` module with Qualcomm's QNN libraries (QTI AI Stack licence:
install and use, never republish) and registers them with onnxruntime at run time. On x86_64
its HTP backend is Qualcomm's x86 emulator of the Hexagon NPU: exact numerics, slow.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError

EP_NAME = "QNNExecutionProvider"
INSTALL_HINT = (
    'pip install "napari-sam2unet[qnn]" (Qualcomm\'s onnxruntime-qnn wheel, for x86_64 Linux with '
    "glibc >= 2.35 and Windows on ARM64)"
)
_VERSION = re.compile(rb"v(\d+\.\d+\.\d+)\.\d{6,}")
_SOC_ARCH = re.compile(rb"soc_type=([A-Za-z0-9]+);arch=(\d+)")
_GRAPH = re.compile(rb"QNNExecutionProvider_[A-Za-z0-9_]+")
# What Qualcomm's libraries print on the process's stdout as a session opens (QNN 2.51): "# LIBNATIVE:
# No alternate configuration present in libnative_tls.conf ... - using default thread-local behavior."
_NATIVE_CHATTER = "LIBNATIVE"


@dataclass(frozen=True)
class Soc:
    name: str
    htp_arch: int
    # QNN's own number for the SoC (the provider option soc_model). Read back from binaries
    # built here: the compiler writes the SoC's name and arch into each .bin.
    soc_model: int


SOCS = {
    "qcs6490": Soc("QCS6490", 68, 93),
    "qcs8550": Soc("QCS8550", 73, 66),
}


def find_soc(name: str) -> Soc:
    try:
        return SOCS[name.lower()]
    except KeyError:
        raise BackendError(f"no QNN build settings for SoC {name!r}; use one of {', '.join(SOCS)}") from None


def qnn_module():
    """The onnxruntime_qnn module, or a one-line BackendError saying what to install."""
    try:
        import onnxruntime_qnn
    except ImportError as error:
        if getattr(error, "name", None) == "onnxruntime_qnn":
            raise BackendError(f"Qualcomm's QNN runtime is not installed: {INSTALL_HINT}") from None
        raise BackendError(f"onnxruntime-qnn is installed but does not load ({error}); reinstall it") from None
    return onnxruntime_qnn


@contextlib.contextmanager
def native_stdout_kept_clean() -> Iterator[None]:
    """While a QNN session opens, the process's stdout (fd 1, where the native libraries print)
    goes to a temporary file: their LIBNATIVE line is dropped, anything else they print is passed
    to stderr. stdout belongs to the command's output (`sam2unet info | ...`, `eval`'s table)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no stdout to protect (a GUI without a console)
        yield
        return
    libc = ctypes.CDLL(None) if os.name == "posix" else None
    with tempfile.TemporaryFile() as capture:
        try:
            os.dup2(capture.fileno(), 1)
            yield
        finally:
            if libc is not None:
                libc.fflush(None)  # C stdio buffers the line while stdout is not a terminal
            os.dup2(saved, 1)
            os.close(saved)
            capture.seek(0)
            printed = capture.read().decode(errors="replace")
    kept = [line for line in printed.splitlines() if line.strip() and _NATIVE_CHATTER not in line]
    if kept:
        print("\n".join(kept), file=sys.stderr)


def installed() -> bool:
    try:
        qnn_module()
    except BackendError:
        return False
    return True


def ep_device():
    """onnxruntime's device entry for the QNN execution provider (registered once per process)."""
    import onnxruntime as ort

    module = qnn_module()
    found = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not found:
        try:
            ort.register_execution_provider_library(EP_NAME, module.get_library_path())
        except Exception as error:  # onnxruntime raises its own types
            raise BackendError(
                f"onnxruntime could not load the QNN execution provider ({str(error).splitlines()[0][:160]}); "
                f"onnxruntime-qnn needs onnxruntime >= 1.24: {INSTALL_HINT}"
            ) from None
        found = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not found:
        raise BackendError("the QNN execution provider offers no device on this machine; use --backend cpu")
    return found[0]


def is_emulator() -> bool:
    """On x86_64 the HTP backend is Qualcomm's emulator, not an NPU."""
    return platform.machine().lower() in ("x86_64", "amd64")


def wheel_version() -> str:
    return getattr(qnn_module(), "__version__", "?")


@functools.cache
def runtime_version() -> str:
    """The QNN SDK version of the installed HTP libraries, e.g. '2.51.0'."""
    library = Path(qnn_module().get_qnn_htp_path())
    with open(library, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        match = _VERSION.search(data)
        version = bytes(match.group(1)).decode() if match else None
    if version is None:
        raise BackendError(f"no QNN version found in {library.name}; reinstall onnxruntime-qnn")
    return version


@dataclass(frozen=True)
class BinaryFacts:
    """What a context binary says about itself: the QNN version, SoC and HTP arch it was built for."""

    qnn_version: str
    soc: str
    htp_arch: int
    graph: str | None  # the graph name, for binaries that onnxruntime's QNN EP built


def binary_facts(path: Path) -> BinaryFacts:
    """Read a QNN context binary's header strings; BackendError if it has none (not a .bin)."""
    data = Path(path).read_bytes()
    version, soc_arch = _VERSION.search(data), _SOC_ARCH.search(data)
    if version is None or soc_arch is None:
        raise BackendError(
            f"{Path(path).name} is not a QNN context binary (no QNN version or SoC in it): it is corrupt or "
            "another kind of file; copy it again or rebuild it with `sam2unet npu build`"
        )
    graph = _GRAPH.search(data)
    return BinaryFacts(
        qnn_version=version.group(1).decode(),
        soc=soc_arch.group(1).decode(),
        htp_arch=int(soc_arch.group(2)),
        graph=graph.group(0).decode() if graph else None,
    )


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def describe() -> str:
    """One line for `sam2unet info`: the wheel, its QNN version and what its HTP backend is here."""
    try:
        version = f"onnxruntime-qnn {wheel_version()}, QNN {runtime_version()}"
    except BackendError as error:
        return f"not usable: {error}"
    if is_emulator():
        return f"{version}; HTP backend: Qualcomm's x86_64 emulator (for tests only: auto never picks it)"
    return f"{version}; HTP backend: this device's NPU, if it has one"
