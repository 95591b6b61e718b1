"""Property: every label map we write reads back in SimpleITK on its input's grid, or is refused.

Headers are drawn field by field (qform/sform codes, quaternions, matrices with shear, pixdim
including 0, negative and NaN, units, data types, scaling, 2D to 5D) and written byte for byte,
bypassing nibabel's image classes, which would tidy them. SimpleITK reads geometry the way
3D Slicer and ITK-SNAP do.
"""

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_sam2unet.errors import InputError
from napari_sam2unet.io import read_volume, write_labels

sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK warns on every odd header; we compare instead

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64]
sizes = st.floats(0.05, 8.0, allow_nan=False)
pixdims = st.one_of(sizes, st.sampled_from([0.0, -1.5, float("nan")]))
offsets = st.floats(-500, 500, allow_nan=False)
unit = st.floats(-1, 1, allow_nan=False)


@st.composite
def headers(draw):
    import nibabel as nib

    header = nib.Nifti1Header()
    shape = draw(st.sampled_from([(5, 4), (5, 4, 3), (4, 3, 3, 2), (5, 4, 3, 1, 1)]))
    dtype = draw(st.sampled_from(DTYPES))
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["pixdim"][0] = draw(st.sampled_from([1.0, -1.0]))  # qfac
    header["pixdim"][1:4] = [draw(pixdims) for _ in range(3)]
    header["xyzt_units"] = draw(st.sampled_from([0, 1, 2, 3, 10]))
    header["qform_code"] = draw(st.integers(0, 4))
    b, c, d = draw(unit), draw(unit), draw(unit)
    norm = max(1.0, float(np.sqrt(b * b + c * c + d * d)))
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = b / norm, c / norm, d / norm
    header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = draw(offsets), draw(offsets), draw(offsets)
    header["sform_code"] = draw(st.integers(0, 4))
    rotation = _rotation(draw(unit), draw(unit), draw(unit))
    scales = np.diag([draw(sizes) for _ in range(3)])
    shear = np.eye(3) + np.triu(np.full((3, 3), draw(st.sampled_from([0.0, 0.0, 0.2]))), 1)
    matrix = rotation @ shear @ scales * draw(st.sampled_from([1.0, 1.0, -1.0]))
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        header[name] = [*matrix[row], draw(offsets)]
    slope = draw(st.sampled_from([1.0, 0.0, 2.5, float("nan")]))
    header["scl_slope"], header["scl_inter"] = slope, draw(st.sampled_from([0.0, -1024.0]))
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    data = (rng.random(shape) * 100).astype(dtype)
    return header, data, draw(st.booleans())


def _rotation(x, y, z):
    """A proper rotation from three numbers (a normalised quaternion)."""
    q = np.array([1.0, x, y, z]) / np.linalg.norm([1.0, x, y, z])
    a, b, c, d = q
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                     [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                     [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])


def _write_raw(path, header, data):
    import gzip

    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + data.tobytes(order="F")
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _itk(path):
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        return None


def _geometry(image, dims):
    size = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(size, size)[:dims, :dims]
    return np.asarray(image.GetOrigin()[:dims]), np.asarray(image.GetSpacing()[:dims]), direction


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=headers())
def test_labels_keep_the_itk_grid_of_any_header_or_are_refused_with_a_message(drawn, tmp_path):
    header, data, gz = drawn
    source = _write_raw(tmp_path / ("scan.nii.gz" if gz else "scan.nii"), header, data)
    out = tmp_path / "labels.nii.gz"
    out.unlink(missing_ok=True)
    try:
        volume = read_volume(source)
        write_labels(out, (volume.data > np.median(volume.data)).astype(np.uint8), volume)
    except InputError as error:  # refused: one line that names the file or what to fix
        assert "\n" not in str(error) and len(str(error)) < 400
        return
    before, after = _itk(source), _itk(out)
    assert (before is None) == (after is None), "ITK reads one of the two files but not the other"
    if before is None:
        return
    dims = min(before.GetDimension(), after.GetDimension(), 3)
    for expected, written in zip(_geometry(before, dims), _geometry(after, dims)):
        np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-4)
