"""The AidLite (Qualcomm NPU) backend, proven against a stand-in `aidlite` module.

The stand-in (tests/aidlite_standin/aidlite) follows AidLite's documented API and runs the
same ONNX model through onnxruntime behind it, so layout and quantisation handling are proven
by parity with the CPU backend on real slices.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import save_model, write_test_card

from napari_sam2unet.backends import open_backend
from napari_sam2unet.backends.aidlite import AidliteBackend, npu_unavailable_reason, select_binary
from napari_sam2unet.backends.onnx import OnnxBackend
from napari_sam2unet.errors import BackendError, ModelError
from napari_sam2unet.models import NpuBinary, load_card, sha256_file, write_card
from napari_sam2unet.preprocess import crop_for_slice, plan_views, sample_crop, to_model_input

STANDIN = Path(__file__).parent / "aidlite_standin"
SIZE = 352
# The range of ImageNet-normalised 0..255 inputs: (0 - 0.485) / 0.229 to (1 - 0.406) / 0.225.
INPUT_RANGE = (-2.1179, 2.6400)


# -- fixtures -------------------------------------------------------------------------------


def build_probe_model(path: Path, layout: str = "nchw") -> Path:
    """A real ONNX model whose logits depend on channel order and on orientation.

    A 5x5 convolution with different, asymmetric kernels per input channel, squashed to
    +-12: swapping channels, transposing H and W or mixing up NHWC/NCHW change its masks.
    layout nhwc: the same model taking N x H x W x 3 (as `sam2unet export --layout nhwc`).
    """
    from onnx import TensorProto, helper, numpy_helper

    grid = np.mgrid[-2:3, -2:3].astype(np.float32)
    bump = np.exp(-(grid[0] ** 2 + grid[1] ** 2) / 2.0)
    weights = np.stack(
        [
            1.0 * bump,
            -0.6 * np.roll(bump, 1, axis=0),
            0.5 * bump * (1.0 + 0.8 * grid[1] - 0.3 * grid[0]),
        ]
    )[None].astype(np.float32)
    nhwc = layout == "nhwc"
    in_shape = ["N", SIZE, SIZE, 3] if nhwc else ["N", 3, SIZE, SIZE]
    out_shape = ["N", SIZE, SIZE, 1] if nhwc else ["N", 1, SIZE, SIZE]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, in_shape)
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)
    initialisers = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.array([9.5], np.float32), "b"),
        numpy_helper.from_array(np.array(12.0, np.float32), "gain"),
    ]
    # Like a trained network, the logits saturate away from the object's edge.
    nodes = [
        helper.make_node("Conv", ["nchw", "w", "b"], ["response"], pads=[2, 2, 2, 2]),
        helper.make_node("Tanh", ["response"], ["squashed"]),
        helper.make_node("Mul", ["squashed", "gain"], ["nchw_logits"]),
    ]
    if nhwc:
        nodes.insert(0, helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Transpose", ["nchw_logits"], ["logits"], perm=[0, 2, 3, 1]))
    else:
        nodes.insert(0, helper.make_node("Identity", ["image"], ["nchw"]))
        nodes.append(helper.make_node("Identity", ["nchw_logits"], ["logits"]))
    graph = helper.make_graph(nodes, "probe", [image], [logits], initialisers)
    save_model(graph, path)
    return path


@pytest.fixture
def aidlite(monkeypatch):
    """The stand-in `aidlite` on sys.path, freshly reset."""
    monkeypatch.delitem(sys.modules, "aidlite", raising=False)
    monkeypatch.syspath_prepend(str(STANDIN))
    import aidlite as module

    assert module.STANDIN
    module.reset()
    yield module
    sys.modules.pop("aidlite", None)


@pytest.fixture
def no_aidlite(monkeypatch):
    """This machine as it is: no `aidlite` module anywhere."""
    monkeypatch.setitem(sys.modules, "aidlite", None)  # import fails, even on a device


@pytest.fixture(scope="module")
def probe_card(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    return write_test_card(build_probe_model(folder / "probe.onnx"))


@pytest.fixture(scope="module")
def real_batch(probe_card) -> np.ndarray:
    """Real slices (two MR, two CT), preprocessed as the engine does; three distinct channels."""
    root = Path(__file__).resolve().parent / "data"  # committed scans (tests/data/README.md)
    mr_path, ct_path = root / "totalseg" / "example_mr_sm.nii.gz", root / "totalseg" / "example_ct_sm.nii.gz"
    slices = []
    for path, window, indices in ((mr_path, "mr", (8, 12)), (ct_path, "soft_tissue", (12, 18))):
        volume = np.asanyarray(nib.load(str(path)).dataobj, dtype=np.float32)
        views = plan_views(volume, window, channels="multiview")
        for index in indices:
            raw = volume[:, :, index]
            crop = crop_for_slice(raw.shape)
            slices.append(to_model_input(sample_crop(raw, crop, (SIZE, SIZE)), views, probe_card.input))
    return np.stack(slices).astype(np.float32)


@pytest.fixture(scope="module")
def cpu_logits(probe_card, real_batch) -> np.ndarray:
    with OnnxBackend(probe_card, threads=1) as backend:
        return backend.predict(real_batch)


def quant_params(dtype: str, low: float, high: float) -> tuple[float, int]:
    """Scale and QNN offset (real = (q + offset) * scale) for [low, high], as a converter sets."""
    info = np.iinfo(dtype)
    scale = (high - low) / (int(info.max) - int(info.min))
    return scale, int(round(low / scale)) - int(info.min)


def npu_card(
    aidlite,
    card,
    folder: Path,
    *,
    layout="nhwc",
    in_dtype="float32",
    out_dtype="float32",
    out_range=(-20.0, 20.0),
    soc="QCS8550",
    framework="TYPE_QNN223",
    card_changes=None,
    name="model_qcs8550.bin",
):
    """The card with an npu entry, and the stand-in .bin it points at (same quantisation)."""
    in_scale, in_offset = quant_params(in_dtype, *INPUT_RANGE) if in_dtype != "float32" else (1.0, 0)
    out_scale, out_offset = quant_params(out_dtype, *out_range) if out_dtype != "float32" else (1.0, 0)
    facts = {"soc": soc, "framework": framework, "layout": layout, "input_dtype": in_dtype, "input_scale": in_scale,
             "input_offset": in_offset, "output_dtype": out_dtype, "output_scale": out_scale,
             "output_offset": out_offset}  # the card's entry and the .bin's header say the same
    path = aidlite.write_bin(folder / name, card.file, **facts)
    binary = NpuBinary(file=path, qnn_version="2.23", **facts)
    binary = dataclasses.replace(binary, **(card_changes or {}))
    return dataclasses.replace(card, npu=[binary])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def names(calls) -> list[str]:
    return [call[0] for call in calls]


# -- parity with the CPU backend --------------------------------------------------------------

PARITY = [
    ("nchw", "float32", "float32"),
    ("nhwc", "float32", "float32"),
    ("nhwc", "uint8", "uint8"),
    ("nhwc", "int16", "int16"),
    ("nchw", "uint8", "float32"),
    ("nhwc", "uint16", "uint16"),
]


@pytest.mark.parametrize("layout,in_dtype,out_dtype", PARITY)
def test_parity_with_cpu_on_real_slices(
    aidlite, probe_card, real_batch, cpu_logits, tmp_path, layout, in_dtype, out_dtype
):
    low, high = float(cpu_logits.min()), float(cpu_logits.max())
    card = npu_card(
        aidlite,
        probe_card,
        tmp_path,
        layout=layout,
        in_dtype=in_dtype,
        out_dtype=out_dtype,
        out_range=(low - 1, high + 1),
    )
    with AidliteBackend(card) as backend:
        npu = backend.predict(real_batch)
    assert npu.shape == cpu_logits.shape == (4, 1, SIZE, SIZE)
    assert npu.dtype == np.float32
    cpu_masks, npu_masks = cpu_logits > 0, npu > 0
    for cpu_mask, npu_mask in zip(cpu_masks, npu_masks, strict=True):
        assert 0.05 < cpu_mask.mean() < 0.95  # a mask worth comparing
        assert dice(cpu_mask, npu_mask) >= 0.99
    if in_dtype == out_dtype == "float32":
        np.testing.assert_allclose(npu, cpu_logits, atol=1e-4)
    else:  # quantisation error only: a few steps of the coarser grid
        assert np.abs(npu - cpu_logits).max() < 0.1 * (high - low)
    # One image per invoke(), in the binary's dtype and layout.
    inputs = [call for call in aidlite.CALLS if call[0] == "set_input_tensor"]
    shape = (1, SIZE, SIZE, 3) if layout == "nhwc" else (1, 3, SIZE, SIZE)
    assert inputs == [("set_input_tensor", 0, in_dtype, shape)] * 4


def test_parity_with_an_nhwc_export(aidlite, real_batch, cpu_logits, tmp_path):
    """The usual NPU path: ONNX exported with --layout nhwc, converted to an NHWC uint8 .bin."""
    import onnxruntime as ort

    onnx_path = build_probe_model(tmp_path / "probe_nhwc.onnx", layout="nhwc")
    # The card as `sam2unet export --batch 1 --layout nhwc` writes it.
    data = {
        "name": "probe_nhwc",
        "file": onnx_path.name,
        "input": {"shape": [1, SIZE, SIZE, 3], "layout": "nhwc", "name": "image"},
        "output": {"shape": [1, 1, SIZE, SIZE]},  # always NCHW in a card (export.card_dict)
    }
    card = load_card(write_card(data, tmp_path / "probe_nhwc.yaml"))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (cpu,) = session.run(None, {"image": np.ascontiguousarray(real_batch.transpose(0, 2, 3, 1))})
    np.testing.assert_allclose(cpu.transpose(0, 3, 1, 2), cpu_logits, atol=1e-4)  # same model
    card = npu_card(aidlite, card, tmp_path, in_dtype="uint8", out_dtype="int16")
    with AidliteBackend(card) as backend:
        npu = backend.predict(real_batch)
    assert min(dice(c > 0, n > 0) for c, n in zip(cpu_logits, npu, strict=True)) >= 0.99


def test_probe_model_catches_layout_and_channel_mistakes(real_batch, cpu_logits, probe_card):
    """The parity tests can fail: swapped channels or transposed slices change the masks."""
    with OnnxBackend(probe_card, threads=1) as backend:
        swapped = backend.predict(np.ascontiguousarray(real_batch[:, ::-1]))
        transposed = backend.predict(np.ascontiguousarray(real_batch.transpose(0, 1, 3, 2)))
    for wrong in (swapped, transposed):
        assert min(dice(c > 0, w > 0) for c, w in zip(cpu_logits, wrong, strict=True)) < 0.99


def test_wrong_offset_convention_breaks_parity(aidlite, probe_card, real_batch, cpu_logits, tmp_path):
    """A card written with zero points (real = (q - zp) * scale) instead of QNN offsets fails."""
    good = npu_card(aidlite, probe_card, tmp_path, in_dtype="uint8")
    offset = good.npu[0].input_offset
    card = dataclasses.replace(good, npu=[dataclasses.replace(good.npu[0], input_offset=-offset)])
    with AidliteBackend(card) as backend:
        npu = backend.predict(real_batch)
    assert min(dice(c > 0, n > 0) for c, n in zip(cpu_logits, npu, strict=True)) < 0.9


# -- the API as AidLite documents it ------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["old", "new"])
def test_both_api_spellings_and_call_sequence(aidlite, probe_card, real_batch, tmp_path, spelling):
    aidlite.reset(builder=spelling, release=spelling)
    card = npu_card(aidlite, probe_card, tmp_path, in_dtype="uint8", out_dtype="uint8")
    backend = AidliteBackend(card)
    backend.predict(real_batch[:2])
    backend.close()
    backend.close()  # twice is harmless
    build = {
        "old": "build_interpretper_from_model_and_config",
        "new": "build_interpreter_from_model_and_config",
    }[spelling]
    release = {"old": "destory", "new": "destroy"}[spelling]
    per_image = ["set_input_tensor", "invoke", "get_output_tensor"]
    assert names(aidlite.CALLS) == [
        "Config.create_instance",
        "Model.create_instance",
        "Model.set_model_properties",
        f"InterpreterBuilder.{build}",
        "init",
        "load_model",
        *per_image,
        *per_image,
        release,
    ]
    props = aidlite.CALLS[2]
    assert props == (
        "Model.set_model_properties",
        [[1, SIZE, SIZE, 3]],
        "TYPE_UINT8",
        [[1, SIZE, SIZE, 1]],
        "TYPE_UINT8",
    )
    with pytest.raises(BackendError, match="closed"):
        backend.predict(real_batch[:1])


def test_prefers_the_corrected_spelling_when_both_exist(aidlite, probe_card, tmp_path):
    card = npu_card(aidlite, probe_card, tmp_path)
    AidliteBackend(card).close()
    assert "InterpreterBuilder.build_interpreter_from_model_and_config" in names(aidlite.CALLS)
    assert names(aidlite.CALLS)[-1] == "destroy"


def test_two_callers_share_one_interpreter_safely(aidlite, probe_card, real_batch, cpu_logits, tmp_path):
    """A second run (e.g. the widget re-run) waits: set_input/invoke/get_output never interleave."""
    from concurrent.futures import ThreadPoolExecutor

    card = npu_card(aidlite, probe_card, tmp_path)
    with AidliteBackend(card) as backend, ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(backend.predict, real_batch[:2])
        second = pool.submit(backend.predict, real_batch[2:])
        npu = np.concatenate([first.result(), second.result()])
    np.testing.assert_allclose(npu, cpu_logits, atol=1e-4)


def test_device_description(aidlite, probe_card, tmp_path):
    card = npu_card(aidlite, probe_card, tmp_path, in_dtype="uint8")
    with AidliteBackend(card) as backend:
        assert backend.max_batch == 1
        assert "TYPE_QNN223" in backend.device and "QCS8550" in backend.device
        assert "uint8" in backend.device


# -- failures become clear messages -------------------------------------------------------------

FAILURES = [
    ("create_model", None, "could not open"),
    ("build", None, "could not build an interpreter.*aidlite-qnn223"),
    ("init", -3, r"init\(\) failed with code -3.*QNN runtime.*aid-pkg install aidlite-qnn223.*DSP"),
    ("load_model", -1, r"load_model\(\) failed with code -1.*QCS8550.*QNN 2.23.*reconvert"),
]


@pytest.mark.parametrize("step,code,message", FAILURES)
def test_failing_open_steps(aidlite, probe_card, tmp_path, step, code, message):
    aidlite.reset(fail={step: code or -1})
    card = npu_card(aidlite, probe_card, tmp_path)
    with pytest.raises(BackendError, match=message) as caught:
        AidliteBackend(card)
    assert "\n" not in str(caught.value)
    if step in ("init", "load_model"):
        assert names(aidlite.CALLS)[-1] == "destroy"  # the interpreter is released


@pytest.mark.parametrize(
    "step,message",
    [
        ("invoke", r"invoke\(\) failed with code -2 on slice 1 of 2.*--backend cpu"),
        ("set_input_tensor", r"set_input_tensor\(\) failed with code -2.*layout and input_dtype"),
    ],
)
def test_failing_run_steps(aidlite, probe_card, real_batch, tmp_path, step, message):
    card = npu_card(aidlite, probe_card, tmp_path)
    with AidliteBackend(card) as backend:
        aidlite.reset(fail={step: -2})
        with pytest.raises(BackendError, match=message):
            backend.predict(real_batch[:2])


def test_device_checks_surface_as_clear_messages(aidlite, probe_card, tmp_path):
    # The QNN runtime the binary needs is not installed.
    aidlite.reset(runtimes={"TYPE_QNN240"})
    card = npu_card(aidlite, probe_card, tmp_path)
    with pytest.raises(BackendError, match=r"init\(\) failed.*aidlite-qnn223"):
        AidliteBackend(card)
    # A binary built for another SoC.
    aidlite.reset(soc="QCS6490")
    with pytest.raises(BackendError, match=r"load_model\(\) failed.*built for QCS8550"):
        AidliteBackend(card, soc="QCS6490")
    # The card says NCHW / float32 but the binary takes NHWC / uint8.
    aidlite.reset()
    for changes in ({"layout": "nchw"}, {"input_dtype": "float32"}):
        wrong = npu_card(aidlite, probe_card, tmp_path, in_dtype="uint8", card_changes=changes)
        with pytest.raises(BackendError, match=r"load_model\(\) failed"):
            AidliteBackend(wrong)
    # A framework type this AidLite does not know.
    wrong = npu_card(aidlite, probe_card, tmp_path, card_changes={"framework": "TYPE_QNN999"})
    with pytest.raises(BackendError, match="no FrameworkType.TYPE_QNN999.*TYPE_QNN223"):
        AidliteBackend(wrong)


def test_bad_binary_entries_are_model_errors(aidlite, probe_card, tmp_path):
    card = npu_card(aidlite, probe_card, tmp_path)
    binary = card.npu[0]
    cases = [
        ({"file": tmp_path / "gone.bin"}, "gone.bin is missing"),
        ({"sha256": "0" * 64}, "corrupt or was replaced"),
        ({"input_dtype": "float16"}, "input_dtype is 'float16'"),
        ({"input_dtype": "uint8", "input_scale": 0.0}, "input_scale must be > 0"),
        ({"layout": "chw"}, "layout is 'chw'"),
    ]
    for changes, message in cases:
        with pytest.raises(ModelError, match=message):
            AidliteBackend(dataclasses.replace(card, npu=[dataclasses.replace(binary, **changes)]))
    ok = dataclasses.replace(binary, sha256=sha256_file(binary.file))
    AidliteBackend(dataclasses.replace(card, npu=[ok])).close()


# -- choosing a backend and a binary ------------------------------------------------------------


def test_auto_picks_the_npu_when_aidlite_imports(aidlite, probe_card, tmp_path):
    card = npu_card(aidlite, probe_card, tmp_path)
    backend, why = open_backend(card, "auto")
    with backend:
        assert isinstance(backend, AidliteBackend)
        assert why.startswith("NPU: model_qcs8550.bin through AidLite")


def test_auto_uses_cpu_without_a_binary(aidlite, probe_card):
    backend, why = open_backend(probe_card, "auto")
    assert isinstance(backend, OnnxBackend)
    assert "no QNN context binary" in why and why.startswith("CPU")


def test_auto_falls_back_to_cpu_when_the_npu_fails(aidlite, probe_card, tmp_path):
    aidlite.reset(fail={"init": -1})
    backend, why = open_backend(npu_card(aidlite, probe_card, tmp_path), "auto")
    assert isinstance(backend, OnnxBackend)
    assert "NPU not used" in why and "init() failed" in why
    with pytest.raises(BackendError, match=r"init\(\) failed"):
        open_backend(npu_card(aidlite, probe_card, tmp_path), "npu")


def test_without_aidlite(no_aidlite, probe_card, tmp_path):
    card = dataclasses.replace(
        probe_card,
        npu=[NpuBinary(file=tmp_path / "m.bin", soc="QCS6490", qnn_version="2.23", framework="TYPE_QNN223")],
    )
    (tmp_path / "m.bin").write_text("{}")
    backend, why = open_backend(card, "auto")
    assert isinstance(backend, OnnxBackend)
    assert why.startswith("CPU (NPU not used: the Python module `aidlite` is not installed (")
    with pytest.raises(BackendError) as caught:
        open_backend(card, "npu")
    message = str(caught.value)
    assert "`aidlite` is not installed" in message and "not on PyPI" in message
    assert "sudo aid-pkg install aidlite-sdk aidlite-qnn223" in message
    assert "docs/npu.md" in message and "--backend cpu" in message
    with pytest.raises(BackendError, match="`aidlite` is not installed.*aid-pkg"):
        AidliteBackend(card)
    # Everything missing is said at once.
    reason = npu_unavailable_reason(probe_card)
    assert "`aidlite` is not installed" in reason and "no QNN context binary" in reason
    assert "aidlite-qnnXYZ` (XYZ: the QNN version of your .bin)" in reason


def test_card_npu_entries_and_soc_choice(tmp_path, probe_card, monkeypatch):
    data = {
        "name": "probe",
        "file": probe_card.file.name,
        "npu": [
            {
                "file": "m_qcs6490.bin",
                "soc": "QCS6490",
                "qnn_version": "2.23",
                "framework": "TYPE_QNN223",
                "layout": "nhwc",
                "input_dtype": "uint8",
                "input_scale": 0.0187,
                "input_offset": -113,
            },
            {
                "file": "m_qcs8550.bin",
                "soc": "QCS8550",
                "qnn_version": "2.31",
                "framework": "TYPE_QNN231",
            },
        ],
    }
    card_path = probe_card.file.parent / "probe_npu.yaml"
    card = load_card(write_card(data, card_path))
    assert [b.file.name for b in card.npu] == ["m_qcs6490.bin", "m_qcs8550.bin"]
    assert card.npu[0].input_offset == -113 and card.npu[0].file.parent == card_path.parent
    binary, why = select_binary(card, "qcom,qcs8550-aim300 qcom,qcs8550")
    assert binary.soc == "QCS8550" and "this device's SoC" in why
    binary, why = select_binary(card, "qcom,qcm6490")  # same chip, other variant
    assert binary.soc == "QCS6490" and "same chip family" in why
    binary, why = select_binary(card, "qcom,sm8650")
    assert binary.soc == "QCS6490" and "no binary for this SoC" in why
    monkeypatch.setenv("SAM2UNET_NPU_SOC", "QCS8550")
    assert select_binary(card)[0].soc == "QCS8550"
    monkeypatch.setattr("napari_sam2unet.backends.qnn_binary.detect_soc", lambda: None)
    binary, why = select_binary(card)
    assert binary.soc == "QCS6490" and "SoC not detected" in why
