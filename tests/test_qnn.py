"""NPU binaries with Qualcomm's own runtime: build, run on the HTP emulator, compare with the CPU.

Needs the [qnn] extra (onnxruntime-qnn: its QNN compiler and x86_64 HTP emulator), which
scripts/setup.sh --test installs on x86_64 Linux with glibc >= 2.35; elsewhere the wheel does
not exist and these tests are skipped. Emulator runs are few and small: about 2 s a slice for
the bundled model, milliseconds for the small one.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_test_card
from test_aidlite import STANDIN, build_probe_model

from napari_sam2unet.errors import BackendError, ModelError
from napari_sam2unet.models import find_model, load_card, sha256_file

DATA = Path(__file__).resolve().parent / "data"  # committed scans (tests/data/README.md)
CT, CT_LABELS = DATA / "totalseg" / "example_ct_sm.nii.gz", DATA / "totalseg" / "example_seg.nii.gz"
HIPPOCAMPUS = DATA / "cases" / "msd_hippo_hippocampus_366"
MIN_DICE = 0.98


def _wheel_exists_here() -> bool:
    libc = platform.libc_ver()[1].split(".")
    return platform.system() == "Linux" and platform.machine() == "x86_64" and len(libc) > 1 and (
        int(libc[0]),
        int(libc[1]),
    ) >= (2, 35)


if not _wheel_exists_here():
    pytest.skip("onnxruntime-qnn has wheels for x86_64 Linux with glibc >= 2.35 only", allow_module_level=True)
# Where the wheel exists, CI installs it: a missing runtime is a failure, not a skip.
import onnxruntime_qnn  # noqa: E402, F401

from napari_sam2unet._sample_data import sample_paths  # noqa: E402
from napari_sam2unet.backends import open_backend  # noqa: E402
from napari_sam2unet.backends import qnn_runtime as runtime  # noqa: E402
from napari_sam2unet.backends.aidlite import AidliteBackend  # noqa: E402
from napari_sam2unet.backends.onnx import OnnxBackend  # noqa: E402
from napari_sam2unet.backends.qnn import QnnBackend  # noqa: E402
from napari_sam2unet.convert.qnn_build import build_npu_binary  # noqa: E402
from napari_sam2unet.convert.qnn_slices import Scan, engine_inputs, sample_scan  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def build_small_model(path: Path) -> Path:
    """The probe model's asymmetric per-channel conv and saturating logits, behind an antialiased
    352 -> 176 Resize and a bilinear Resize back: small, but it needs the QNN rewrites."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    probe = onnx.load(str(build_probe_model(path.with_name("probe_weights.onnx"))))
    weights = [t for t in probe.graph.initializer if t.name in ("w", "b", "gain")]
    half, double = (numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                    (("half", [1, 1, 0.5, 0.5]), ("double", [1, 1, 2, 2])))
    nodes = [
        helper.make_node("Resize", ["image", "", "half"], ["small"], mode="linear", antialias=1, name="entry"),
        helper.make_node("Conv", ["small", "w", "b"], ["response"], pads=[2, 2, 2, 2], name="conv"),
        helper.make_node("Tanh", ["response"], ["squashed"], name="tanh"),
        helper.make_node("Mul", ["squashed", "gain"], ["small_logits"], name="gain"),
        helper.make_node("Resize", ["small_logits", "", "double"], ["logits"], mode="linear", name="exit"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 352, 352])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 352, 352])],
        [*weights, half, double],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A QCS6490 a16w8 binary of the small model, built as `sam2unet npu build` builds it."""
    folder = tmp_path_factory.mktemp("small")
    card = write_test_card(build_small_model(folder / "small.onnx"))
    facts = build_npu_binary(
        card, "qcs6490", "a16w8", calibration=[Scan(CT, CT_LABELS)], parity=[sample_scan()],
        calibration_slices=8, parity_slices=4, say=lambda *a: None,
    )
    return load_card(card.card_path), facts


@pytest.fixture(scope="module")
def real_slices(built):
    """Engine-prepared box crops of a scan used neither to calibrate nor to measure the build."""
    card, _ = built
    scan = Scan(HIPPOCAMPUS / "image.nii.gz", HIPPOCAMPUS / "label.nii.gz")
    with OnnxBackend(card, threads=2) as cpu:
        inputs = engine_inputs(cpu, [scan], 6)
        return inputs, cpu.predict(inputs)


def one_line_error(kind, call) -> str:
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_build_writes_the_binary_and_its_card_entries(built):
    card, facts = built
    (binary,) = card.npu
    assert binary.file.is_file() and binary.sha256 == sha256_file(binary.file)
    assert (binary.soc, binary.layout, binary.qnn_version) == ("QCS6490", "nchw", runtime.runtime_version())
    assert binary.input_dtype == binary.output_dtype == "uint16" and binary.input_scale > 0
    recorded = card.raw["qnn"][binary.file.name]
    assert recorded == facts
    assert (recorded["htp_arch"], recorded["precision"]) == (68, "a16w8")
    assert recorded["calibration"]["slices"] == 8 and len(recorded["calibration"]["sha256"]) == 64
    assert recorded["parity"]["dice"] >= MIN_DICE and recorded["parity"]["on"] == "x86_64 HTP emulator"
    inside = runtime.binary_facts(binary.file)  # what the compiler wrote into the binary itself
    assert (inside.soc, inside.htp_arch, inside.graph) == ("QCS6490", 68, recorded["graph"])


def test_qnn_backend_matches_the_cpu_on_real_slices(built, real_slices):
    card, _ = built
    inputs, cpu_logits = real_slices
    backend, why = open_backend(card, "qnn")
    with backend:
        assert isinstance(backend, QnnBackend) and "emulator" in why and "emulator" in backend.device
        logits = backend.predict(inputs)
    assert min(dice(c > 0, q > 0) for c, q in zip(cpu_logits, logits)) >= MIN_DICE


def test_auto_never_picks_the_emulator(built):
    card, _ = built
    backend, why = open_backend(card, "auto")
    with backend:
        assert isinstance(backend, OnnxBackend)
    assert why.startswith("CPU (NPU not used: ") and "QNN: QNN's HTP on x86_64 is Qualcomm's emulator" in why


def test_aidlite_backend_runs_the_real_binary_on_qualcomm_numerics(built, real_slices, monkeypatch):
    """The stand-in device hands AidLite's input to the emulator: layouts, quantised codes and
    flat outputs of our AidLite code meet the binary's own tensors."""
    card, _ = built
    inputs, cpu_logits = real_slices
    monkeypatch.delitem(sys.modules, "aidlite", raising=False)
    monkeypatch.syspath_prepend(str(STANDIN))
    import aidlite

    aidlite.reset(soc="QCS6490")
    try:
        with AidliteBackend(card, soc="QCS6490") as npu, QnnBackend(card, soc="QCS6490") as qnn:
            through_aidlite, through_qnn = npu.predict(inputs), qnn.predict(inputs)
    finally:
        sys.modules.pop("aidlite", None)
    np.testing.assert_array_equal(through_aidlite, through_qnn)  # the same binary, the same codes
    assert min(dice(c > 0, a > 0) for c, a in zip(cpu_logits, through_aidlite)) >= MIN_DICE


def _copy_card(card, folder: Path, change, keep_hash: bool = True) -> object:
    """A copy of the card and its files, the binary changed by `change(bytes) -> bytes` and its
    sha256 updated (or dropped, as in a card written by hand)."""
    folder.mkdir()
    for path in (card.file, card.card_path, card.npu[0].file):
        shutil.copy(path, folder / path.name)
    binary = folder / card.npu[0].file.name
    binary.write_bytes(change(binary.read_bytes()))
    data = yaml.safe_load((folder / card.card_path.name).read_text())
    data["npu"][0]["sha256"] = sha256_file(binary) if keep_hash else None
    (folder / card.card_path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return load_card(folder / card.card_path.name)


def test_a_binary_from_a_newer_qnn_is_refused_in_one_line(built, tmp_path):
    card, _ = built
    here = runtime.runtime_version()
    newer = f"{int(here.split('.')[0])}.{int(here.split('.')[1]) + 5}.0"
    # The version the compiler wrote (the strings our check reads), as a newer QNN would write it.
    patched = _copy_card(card, tmp_path / "newer", lambda b: b.replace(f"v{here}.".encode(), f"v{newer}.".encode()))
    message = one_line_error(BackendError, lambda: QnnBackend(patched))
    assert f"built with QNN {newer}, newer than this runtime's QNN {here}" in message
    assert "upgrade onnxruntime-qnn" in message


def test_a_binary_for_another_soc_is_refused_in_one_line(built, monkeypatch):
    card, _ = built
    monkeypatch.setenv("SAM2UNET_NPU_SOC", "QCS8550")
    message = one_line_error(BackendError, lambda: QnnBackend(card))
    assert "compiled for QCS6490 (HTP v68) but this device is QCS8550" in message
    backend, why = open_backend(card, "auto")  # auto still segments, on the CPU
    with backend:
        assert isinstance(backend, OnnxBackend)


def test_a_corrupt_binary_is_refused_in_one_line(built, tmp_path):
    """A copy cut short, junk, or a file changed behind the card's back: one line each, and QNN
    never sees a binary whose sha256 differs from the card's (a binary damaged inside can crash
    QNN itself, which is why `npu build` always writes the hash)."""
    card, _ = built
    cut = _copy_card(card, tmp_path / "cut", lambda b: b[: len(b) // 2], keep_hash=False)
    message = one_line_error(BackendError, lambda: QnnBackend(cut))
    assert "QNN could not load" in message and "corrupt" in message
    junk = _copy_card(card, tmp_path / "junk", lambda b: b"x" * 99)
    assert "is not a QNN context binary" in one_line_error(BackendError, lambda: QnnBackend(junk))
    replaced = _copy_card(card, tmp_path / "replaced", lambda b: b)
    replaced.npu[0].file.write_bytes(b"changed" + replaced.npu[0].file.read_bytes()[7:])
    assert "is corrupt or was replaced" in one_line_error(ModelError, lambda: QnnBackend(replaced))


def test_fp16_on_a_v68_soc_is_refused_before_any_work(built):
    card, _ = built
    message = one_line_error(ModelError, lambda: build_npu_binary(card, "qcs6490", "fp16"))
    assert "QCS6490 (HTP v68) has no float16" in message


def test_info_reports_the_qnn_runtime_and_its_emulator(capsys):
    from napari_sam2unet.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"qnn: onnxruntime-qnn {onnxruntime_qnn.__version__}, QNN {runtime.runtime_version()}" in out
    assert "HTP backend: Qualcomm's x86_64 emulator (for tests only: auto never picks it)" in out


def test_npu_build_without_the_qnn_extra_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['onnxruntime_qnn'] = None\n"
        "from napari_sam2unet.cli import main\n"
        "sys.exit(main(['npu', 'build', 'sam2unet-compact', '--soc', 'qcs6490']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "QNN runtime is not installed" in result.stderr and 'pip install "napari-sam2unet[qnn]"' in result.stderr


def _listed_binaries():
    card = find_model()
    if not card.npu:
        return [pytest.param(None, marks=pytest.mark.skip(reason="the bundled card lists no QNN binary yet "
                                                                  "(scripts/build_npu_binaries.sh adds them)"))]
    return [pytest.param(binary, id=binary.file.name) for binary in card.npu]


@pytest.mark.parametrize("binary", _listed_binaries())
def test_every_shipped_binary_matches_the_cpu(binary):
    """Each binary the bundled card lists runs on the emulator and agrees with the CPU model."""
    card = find_model()
    recorded = card.raw["qnn"][binary.file.name]
    assert recorded["parity"]["dice"] >= MIN_DICE
    with OnnxBackend(card, threads=2) as cpu, QnnBackend(card, binary=binary, soc=binary.soc) as qnn:
        # the bundled sample MRI: always installed, so CI checks the shipped binaries too
        inputs = engine_inputs(cpu, [Scan(*sample_paths())], 3)
        reference, got = cpu.predict(inputs), qnn.predict(inputs)
    assert binary.sha256 == sha256_file(binary.file)
    assert dice(reference > 0, got > 0) >= MIN_DICE


def test_qualcomms_line_stays_off_stdout(built, tmp_path):
    """QNN's libraries print "# LIBNATIVE: No alternate configuration ..." on stdout as a session
    opens: in a fresh process (it prints once a process), segment's stdout stays empty."""
    card, _ = built
    out = tmp_path / "ct.nii.gz"
    command = [sys.executable, "-m", "napari_sam2unet.cli", "segment", str(CT), "--box", "20:30,30,80,80",
               "--model", str(card.card_path), "--backend", "qnn", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and "LIBNATIVE" not in run.stderr, (run.stdout, run.stderr)
    assert "HTP emulator" in run.stderr and out.is_file()
