#!/usr/bin/env bash
# Builds the bundled model's QNN context binaries (QCS6490 / HTP v68 and QCS8550 / HTP v73, a16w8)
# into models/ and writes their npu and qnn entries into models/sam2unet-compact.yaml, with the
# parity measured on the HTP emulator. Run it again whenever the bundled model changes.
# Needs the [qnn] extra (x86_64 Linux, glibc >= 2.35) and shared/ beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data
python=${PYTHON:-.venv/bin/python}
# Calibration on scans the model was trained on (real CT organs and hand-drawn brain regions);
# parity on the held-out sample MRI, which calibration never sees.
calibration=(
  --calibration "$data/totalseg/example_ct_sm.nii.gz:$data/totalseg/example_seg.nii.gz"
  --calibration "$data/colin27/ch2.nii.gz:$data/colin27/aal.nii.gz"
)
for soc in qcs6490 qcs8550; do
  "$python" -m napari_sam2unet.cli npu build models/sam2unet-compact.onnx --soc "$soc" --precision a16w8 \
    "${calibration[@]}" --calibration-slices 64 --parity-slices 16
done
ls -l models/*.bin
