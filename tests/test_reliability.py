"""Issue 13's defects outside the CLI: silent wrong results, resources, model and card problems.

Real components throughout: NIfTI files on disk, onnxruntime sessions of small ONNX models,
SimpleITK to read geometry the way 3D Slicer and ITK-SNAP do.
"""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import build_brightness_model, sphere_volume, write_nifti, write_test_card

from napari_sam2unet.backends.onnx import OnnxBackend
from napari_sam2unet.engine import Engine
from napari_sam2unet.errors import BackendError, InputError, ModelError
from napari_sam2unet.io import read_volume, write_labels
from napari_sam2unet.models import load_card
from napari_sam2unet.preprocess import plan_views
from napari_sam2unet.prompts import Box, Prompts


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


# --- defect 4: tiny intensity ranges ------------------------------------------------------


@pytest.mark.parametrize("window", ["auto", "mr", "0:1e-9"])
def test_an_adc_map_in_si_units_is_segmented_like_the_same_map_in_usual_units(brightness_card, window):
    """ADC in m^2/s spans about 3e-9: the model must see the image, not black."""
    data, truth = sphere_volume()
    adc = (data * 1e-12).astype(np.float32)  # 1e-10 background, 9e-10 ball
    engine = Engine(OnnxBackend(brightness_card, threads=1))
    engine.set_volume(adc, (1.0, 1.0, 1.0), window=window)
    mask = engine.segment(Prompts(), "volume").mask
    assert dice(mask, truth) > 0.9


@pytest.mark.parametrize("window, words", [("5:1", "LOW must be below HIGH, e.g. --window 1:5"),
                                           ("3:3", "equal"), ("nan:inf", "finite numbers"),
                                           ("-inf:5", "finite numbers")])
def test_bad_custom_windows_say_what_is_wrong_with_them(window, words):
    data, _ = sphere_volume()
    with pytest.raises(InputError) as caught:
        plan_views(data, window)
    assert words in str(caught.value)
    assert "nearly constant" not in str(caught.value) and "window window" not in str(caught.value)


# --- defect 5: complex images, card thresholds, float labels, spacing ------------------------


def test_a_complex_image_is_refused_not_cut_to_its_real_part(tmp_path):
    data = (np.random.rand(8, 8, 4) + 1j * np.random.rand(8, 8, 4)).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "complex.nii"))
    with pytest.raises(InputError, match="complex.nii holds complex values; save its magnitude"):
        read_volume(tmp_path / "complex.nii")


def test_float_labels_are_refused_not_truncated(tmp_path):
    volume = read_volume(write_nifti(tmp_path / "img.nii.gz", np.random.rand(6, 5, 4).astype(np.float32)))
    labels = np.zeros((6, 5, 4), np.float32)
    labels[1, 1, 1] = 0.6
    with pytest.raises(InputError, match="whole numbers; found 0.6"):
        write_labels(tmp_path / "seg.nii.gz", labels, volume)
    assert not (tmp_path / "seg.nii.gz").exists()
    labels[1, 1, 1] = 2.0  # whole numbers stored as floats are fine
    out = write_labels(tmp_path / "seg.nii.gz", labels, volume)
    assert int(np.asarray(nib.load(str(out)).dataobj)[1, 1, 1]) == 2


@pytest.mark.parametrize("spacing", [(1.0, float("nan"), 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 1.0)])
def test_engine_refuses_spacing_that_is_not_a_positive_size(brightness_card, spacing):
    data, _ = sphere_volume()
    engine = Engine(OnnxBackend(brightness_card, threads=1))
    with pytest.raises(InputError, match="must be three positive sizes in mm"):
        engine.set_volume(data, spacing)


# --- defect 6: pixdim 0 with a valid sform ---------------------------------------------------


def _raw_nifti(path, header, data):
    """A file with exactly this header: nibabel's image classes would 'fix' its geometry."""
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["vox_offset"] = 352
    with open(path, "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * 4)
        handle.write(data.tobytes(order="F"))
    return path


def _same_itk_geometry(a, b):
    first, second = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    np.testing.assert_allclose(second.GetOrigin(), first.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(second.GetSpacing(), first.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(second.GetDirection(), first.GetDirection(), atol=1e-5)


def test_pixdim_zero_with_a_3mm_sform_keeps_the_itk_geometry(tmp_path):
    header = nib.Nifti1Header()
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-30, 12, 5)
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    header["pixdim"][1:4] = 0
    source = _raw_nifti(tmp_path / "pix0.nii", header, np.random.rand(10, 9, 8).astype(np.float32))
    volume = read_volume(source)
    out = write_labels(tmp_path / "labels.nii", (volume.data > 0.5).astype(np.uint8), volume)
    _same_itk_geometry(source, out)


# --- defect 7: threads and batches ------------------------------------------------------------


@pytest.mark.parametrize("threads", [0, -3, 10000])
def test_threads_outside_the_cores_are_refused(brightness_card, threads):
    with pytest.raises(BackendError, match="use 1 to"):
        OnnxBackend(brightness_card, threads=threads)


def test_many_boxes_on_one_slice_go_to_onnxruntime_in_batches_of_the_backends_size(brightness_card):
    class Recording(OnnxBackend):
        def _run(self, chunk):
            self.calls.append(chunk.shape[0])
            return super()._run(chunk)

    backend = Recording(brightness_card, threads=1)
    backend.calls = []
    data, _ = sphere_volume()
    engine = Engine(backend)
    engine.set_volume(data, (1.0, 1.0, 1.0))
    boxes = [Box(6, 4 + i % 20, 4 + i // 20, 14 + i % 20, 14 + i // 20) for i in range(30)]
    result = engine.segment(Prompts(boxes=boxes), "slices")
    assert max(backend.calls) <= backend.max_batch and sum(backend.calls) == 30
    assert result.mask[:, :, 6].any()


def test_a_fixed_batch_model_gets_full_batches(tmp_path):
    card = write_test_card(build_brightness_model(tmp_path / "fixed4.onnx", batch=4))
    backend = OnnxBackend(card, threads=1)
    batch = np.zeros((5, 3, 352, 352), np.float32)
    batch[4] = 3.0
    logits = backend.predict(batch)
    assert logits.shape == (5, 1, 352, 352) and logits[4].min() > logits[0].max()


# --- defects 5 and 9: model cards --------------------------------------------------------------


def _card_with(tmp_path, **changes):
    """The test card with some fields replaced (None removes one), written as YAML."""
    import yaml

    card = write_test_card(build_brightness_model(tmp_path / "m.onnx"))
    data = dict(card.raw)
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer] = {**data[outer], inner: value}
        elif value is None:
            data.pop(key)
        else:
            data[key] = value
    card.card_path.write_text(yaml.safe_dump(data))
    return card.card_path


@pytest.mark.parametrize("changes, words", [
    ({"threshold": 7}, "'threshold' is 7; it must be (0, 1)"),
    ({"threshold": "high"}, "'threshold' is 'high'; it must be a number"),
    ({"input.std": [0, 0, 0]}, "'input.std' is 0; it must be > 0"),
    ({"input.shape": [-1, 3, 0, 352]}, "expected Nx3xHxW with H, W >= 1"),
    ({"input": "oops"}, "'input' is 'oops'; it must be a mapping"),
    ({"npu": [{"soc": "QCS6490"}]}, "an npu entry has no 'file'"),
    ({"npu": [{"file": "m.bin", "colour": "red"}]}, "unknown fields colour"),
    ({"sha256": 12345}, "'sha256' is 12345; it must be 64 hex digits"),
    ({"flip_average": "yes"}, "use true or false"),
])
def test_bad_cards_are_refused_with_the_field_named(tmp_path, changes, words):
    path = _card_with(tmp_path, **changes)
    with pytest.raises(ModelError) as caught:
        load_card(path)
    assert words in str(caught.value) and str(path) in str(caught.value)


def test_a_scan_given_as_model_is_not_read_as_a_card(tmp_path):
    scan = write_nifti(tmp_path / "scan.nii.gz", np.random.rand(6, 5, 4).astype(np.float32))
    with pytest.raises(ModelError, match="scan.nii.gz is not a model: give a .onnx file"):
        load_card(scan)


def test_one_bad_card_is_skipped_with_a_warning_and_the_others_are_found(tmp_path, monkeypatch, brightness_card):
    from napari_sam2unet.models import ModelCardWarning, find_model, list_models

    (brightness_card.file.parent / "broken.yaml").write_text("file: broken.onnx\nthreshold: [1, 2]\n")
    monkeypatch.setenv("SAM2UNET_MODELS", str(brightness_card.file.parent))
    with pytest.warns(ModelCardWarning, match="broken.yaml"):
        names = [card.name for card in list_models()]
    assert "brightness" in names and "sam2unet-compact" in names
    with pytest.warns(ModelCardWarning):
        assert find_model().name == "sam2unet-compact"  # the default model still segments


# --- defect 9: ONNX models that break the contract -------------------------------------------


def _onnx(path, inputs, outputs, nodes, initializers=()):
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "bad", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _value(name, elem, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def test_an_output_smaller_than_declared_is_a_model_error(tmp_path):
    from onnx import TensorProto, helper

    # Declares 352x352 logits but really returns 176x176 (a strided slice).
    starts = helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0])
    ends = helper.make_tensor("ends", TensorProto.INT64, [2], [352, 352])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    steps = helper.make_tensor("steps", TensorProto.INT64, [2], [2, 2])
    raxes = helper.make_tensor("raxes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("ReduceMean", ["image", "raxes"], ["mean"], keepdims=1),
             helper.make_node("Slice", ["mean", "starts", "ends", "axes", "steps"], ["logits"])]
    path = _onnx(tmp_path / "small.onnx", [_value("image", TensorProto.FLOAT, ["N", 3, 352, 352])],
                 [_value("logits", TensorProto.FLOAT, ["N", 1, 352, 352])], nodes, [starts, ends, axes, steps, raxes])
    backend = OnnxBackend(write_test_card(path), threads=1)
    with pytest.raises(ModelError, match="returned 2x1x176x176 for 2 slices"):
        backend.predict(np.zeros((2, 3, 352, 352), np.float32))


def test_an_int32_input_is_a_model_error(tmp_path):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["logits"], keepdims=1, axes=[1])]
    nodes[1] = helper.make_node("ReduceMean", ["f", "raxes"], ["logits"], keepdims=1)
    raxes = helper.make_tensor("raxes", TensorProto.INT64, [1], [1])
    path = _onnx(tmp_path / "int.onnx", [_value("image", TensorProto.INT32, ["N", 3, 352, 352])],
                 [_value("logits", TensorProto.FLOAT, ["N", 1, 352, 352])], nodes, [raxes])
    with pytest.raises(ModelError, match="input is tensor\\(int32\\), not float32"):
        OnnxBackend(write_test_card(path), threads=1)


def test_a_second_required_input_is_a_model_error(tmp_path):
    from onnx import TensorProto, helper

    raxes = helper.make_tensor("raxes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Add", ["image", "bias"], ["sum"]),
             helper.make_node("ReduceMean", ["sum", "raxes"], ["logits"], keepdims=1)]
    path = _onnx(tmp_path / "two.onnx", [_value("image", TensorProto.FLOAT, ["N", 3, 352, 352]),
                                         _value("bias", TensorProto.FLOAT, ["N", 3, 352, 352])],
                 [_value("logits", TensorProto.FLOAT, ["N", 1, 352, 352])], nodes, [raxes])
    with pytest.raises(ModelError, match="takes 2 inputs \\(image, bias\\); a SAM2-UNet model takes one image"):
        OnnxBackend(write_test_card(path), threads=1)


# --- issue 25: cards from a models folder are small and without aliases --------------------


def _alias_bomb(levels: int) -> str:
    """Each level a list of nine aliases of the one before: 9**(levels + 1) strings when expanded."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nthreshold: *l{levels}\n"


@pytest.mark.parametrize("extra", [_alias_bomb(5), "note: '" + "x" * (1 << 20) + "'\n"])
def test_an_alias_bomb_or_a_huge_card_is_skipped_with_one_warning(tmp_path, monkeypatch, brightness_card, extra):
    # (9 levels took 44 s and ended in MemoryError: the error message printed the threshold's value)
    from napari_sam2unet.models import ModelCardWarning, find_model, list_models

    card = brightness_card.card_path.read_text().replace("threshold: 0.5\n", "")
    (tmp_path / "bomb.yaml").write_text(card + extra)
    monkeypatch.setenv("SAM2UNET_MODELS", str(tmp_path))
    with pytest.warns(ModelCardWarning, match="bomb.yaml") as caught:
        names = [card.name for card in list_models()]
    messages = [str(w.message) for w in caught if "bomb.yaml" in str(w.message)]
    assert len(messages) == 1 and len(messages[0]) < 500, messages
    assert ("aliases (*name) are not allowed" if "&l0" in extra else "is over 1 MiB: not a model card") in messages[0]
    assert "brightness" in names and "sam2unet-compact" in names
    with pytest.warns(ModelCardWarning):
        assert find_model().name == "sam2unet-compact"  # the default model still segments


def test_a_card_written_with_a_repeated_value_reads_back(tmp_path, brightness_card):
    from napari_sam2unet.models import write_card

    shared = [1, 2, 3]
    data = {**brightness_card.raw, "notes": {"first": shared, "second": shared}}
    card = load_card(write_card(data, tmp_path / "copy.yaml"))
    assert card.raw["notes"]["second"] == [1, 2, 3]


# --- issue 25: nan and inf in prompts from the API or a prompts sidecar ----------------------


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_a_box_or_point_with_nan_or_inf_is_refused_in_one_line(tmp_path, brightness_card, bad):
    import json

    from napari_sam2unet.errors import PromptError
    from napari_sam2unet.manifest import CaseSpec, resolve_case
    from napari_sam2unet.prompts import Point

    data, _ = sphere_volume()
    engine = Engine(OnnxBackend(brightness_card, threads=1))
    engine.set_volume(data, (1.0, 1.0, 1.0))
    for prompts in (Prompts([Box(6, 14, 12, bad, 28)]), Prompts([Box(6, 14, 12, 34, 28)], [Point(6, bad, 20)])):
        with pytest.raises(PromptError, match="not numbers: give voxel indices, not nan or inf"):
            engine.segment(prompts, "slice")
    # a batch's prompts sidecar (JSON allows Infinity and NaN)
    sidecar = tmp_path / "prompts.json"
    sidecar.write_text(json.dumps({"prompts": {"boxes": [{"slice": 6, "i0": 14, "j0": 12, "i1": bad, "j1": 28}]}}))
    case = resolve_case(CaseSpec("ball", tmp_path / "ball.nii.gz", {"prompts": str(sidecar)}))
    with pytest.raises(PromptError, match="not numbers"):
        case.prompts.validate(data.shape, 2)
