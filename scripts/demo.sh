#!/usr/bin/env bash
# Installs napari-sam2unet and segments the bundled sample MRI's liver with the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
image=$(.venv/bin/python -c "from napari_sam2unet._sample_data import sample_paths; print(sample_paths()[0])")
# A box around the liver on slice 10 (rows 8-42, columns 21-70 of the 117x91 axial slice),
# propagated up and down the volume until the liver ends.
.venv/bin/sam2unet segment "$image" --box 10:8,21,43,71 --scope propagate \
  --out out/sample_liver.nii.gz --overwrite
echo "to look at it in napari: .venv/bin/pip install -e '.[napari]'" \
  "&& .venv/bin/napari --plugin napari-sam2unet $image out/sample_liver.nii.gz"
