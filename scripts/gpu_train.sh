#!/usr/bin/env bash
# Train a larger bundled-model candidate on a lent GPU machine in one call (issue 10, item 6).
#
#   bash scripts/gpu_train.sh pack            # here: data, manifest and wheels into .gpu/ (ignored)
#   device run, carry [".gpu"], timeout_s 600:
#       bash scripts/gpu_train.sh run          # there: probe, train, checkpoints in parts into $OUT
#   bash scripts/gpu_train.sh unpack DIR      # here: DIR = the run's files_at; rebuilds
#                                              # runs/gpu_<config>/best.pt and runs/gpu_<config>_final/best.pt
#
# The machine has PyTorch but not nibabel (carried unpacked) nor ../shared (the manifest's
# train cases and a few small validation cases travel in .gpu/data, with the manifest's own
# relative paths). Everything that travels must stay under 64 MiB together with the repository,
# so the copies are made smaller without changing what a crop shows: float images as scaled
# int16 and int32 CT as int16 (both far finer than the model's 8-bit input), all gzip -9.
# Validation there uses those few small cases; score the result here on all of them. Files come
# back at most 16 MiB each, so the best and the final EMA weights travel as float16 in 15 MiB
# parts, and unpack stores them as float32 again.
# Environment: CONFIG (medium), CHANNELS (prompted: the model sees clicks and a prior, as the
# bundled one does), BATCH (32), WORKERS (14), TRAIN_SECONDS (390), SEED (0), CLICK_EXTENT
# ("0.3 6": --click-crop-extent), WRONG_OBJECT (0: --wrong-object-share), CALL_SECONDS (570: the
# command ends inside the call's limit).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-medium}
CHANNELS=${CHANNELS:-prompted}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-14}
TRAIN_SECONDS=${TRAIN_SECONDS:-390}
SEED=${SEED:-0}
CLICK_EXTENT=${CLICK_EXTENT:-0.3 6}
WRONG_OBJECT=${WRONG_OBJECT:-0}
CALL_SECONDS=${CALL_SECONDS:-570}
PROBE_STEPS=${PROBE_STEPS:-60}
SMALL_VALIDATION="itksnap_mricrop msd_hippocampus_280 msd_hippocampus_290 msd_hippocampus_300
  msd_hippocampus_310 acdc_patient001_ED acdc_patient002_ED"

pack() {
  local python=${PYTHON:-.venv/bin/python}
  : "${SAM2UNET_DATA:?set SAM2UNET_DATA to the data folder the bundled manifest reads (../shared/data)}"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
  rm -rf .gpu && mkdir -p .gpu/data .gpu/wheels .gpu/site
  "$python" - "$SMALL_VALIDATION" <<'EOF'
import gzip, os, shutil, sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from napari_sam2unet.training.datasets import default_manifest, find_cases


def shrink_copy(source: Path, target: Path) -> None:
    """A smaller copy of a NIfTI file: CT's int32 as int16 (the same numbers); MR stored as float
    or uint16 as 256 levels over its range (the model sees 8-bit windows of it)."""
    image = nib.load(source)
    dtype = image.get_data_dtype()
    if dtype.kind == "f" or dtype in (np.int32, np.uint16):
        data = np.asarray(image.dataobj, dtype=np.float64)
        header = image.header.copy()
        if dtype == np.int32:
            assert -32768 <= data.min() and data.max() <= 32767, source
            header.set_data_dtype(np.int16)
            header.set_slope_inter(1, 0)
            data = data.astype(np.int16)
        else:
            low, high = data.min(), data.max()
            step = (high - low) / 255 or 1.0
            header.set_data_dtype(np.uint8)
            header.set_slope_inter(step, low)
            data = np.round((data - low) / step).astype(np.uint8)
        image = nib.Nifti1Image(data, image.affine, header)
        image.header.set_slope_inter(*header.get_slope_inter())
        nib.save(image, target)
    else:
        shutil.copyfile(source, target)
    if target.name.endswith(".gz"):
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


keep_validation = set(sys.argv[1].split())
root = Path(os.environ["SAM2UNET_DATA"]).resolve()
manifest = yaml.safe_load(default_manifest().read_text())
chosen = {c.name for c in find_cases([default_manifest()], "train")
          if c.split == "train" or (c.split == "validation" and c.name in keep_validation)}
manifest["cases"] = [entry for entry in manifest["cases"] if entry["name"] in chosen]
copied = 0
# A label read as "above a value" (a skull-stripped image as the brain) travels as that mask.
for entry in manifest["cases"]:
    for label in entry.get("labels", []):
        if isinstance(label, dict) and "above" in label:
            source, target = root / label["file"], Path(".gpu/data") / label["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            image = nib.load(source)
            mask = (np.asarray(image.dataobj) > label["above"]).astype(np.uint8)
            nib.save(nib.Nifti1Image(mask, image.affine), target)
            label["above"] = 0
for case in find_cases([default_manifest()], "train"):
    if case.name not in chosen:
        continue
    for file in case.files():
        target = Path(".gpu/data") / Path(file).resolve().relative_to(root)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shrink_copy(Path(file), target)
            copied += target.stat().st_size
Path(".gpu/manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
print(f"packed {len(chosen)} cases, {copied / 2**20:.1f} MiB")
EOF
  version=$("$python" -c "import nibabel; print(nibabel.__version__)")
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/wheels "nibabel==$version"
  # nibabel travels unpacked, less its tests (6 of its 8 MiB).
  "$python" -m zipfile -e .gpu/wheels/nibabel-*.whl .gpu/site
  rm -rf .gpu/wheels
  find .gpu/site -type d -name tests -prune -exec rm -rf {} +
  local tree carried
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  carried=$(du -sb .gpu | cut -f1)
  echo "travels: repository $((tree / 2**20)) MiB + .gpu $((carried / 2**20)) MiB (limit 64 MiB)"
  [ $((tree + carried)) -lt $((63 * 2**20)) ] || { echo "over the 64 MiB limit: carry less"; exit 1; }
}

run() {
  : "${OUT:?run this on the device machine, where OUT is set}"
  local started=$SECONDS logs=/tmp/gpu_logs
  export PYTHONPATH=$PWD/.gpu/site:$PWD/src SAM2UNET_DATA=$PWD/.gpu/data PYTHONUNBUFFERED=1
  mkdir -p "$logs"
  { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$logs/machine.txt"
  echo "config $CONFIG, channels $CHANNELS, click crop extent $CLICK_EXTENT, wrong objects $WRONG_OBJECT" >> "$logs/machine.txt"
  echo "cores $(nproc)" >> "$logs/machine.txt"
  local extent
  read -r -a extent <<< "$CLICK_EXTENT"
  local train=(python3 -m napari_sam2unet.cli train --config "$CONFIG" --channels "$CHANNELS" --data .gpu/manifest.yaml
    --batch "$BATCH" --workers "$WORKERS" --seed "$SEED" --val-crops 96 --click-crop-extent "${extent[@]}"
    --wrong-object-share "$WRONG_OBJECT")
  # A short probe measures crops per second with this many workers; the run is sized to fit.
  "${train[@]}" --out-dir /tmp/probe --steps "$PROBE_STEPS" --warmup 10 --val-every 100000 --log-every 20 2>&1 \
    | tee "$logs/probe.log"
  local rate steps left
  rate=$(grep -o '[0-9.]* crops/s' "$logs/probe.log" | tail -1 | cut -d' ' -f1)
  # The probe's last 20 steps ran at 153 crops/s, the first run at ~115 on average (half the
  # batches get click rounds): size for 80% of it, and checkpoint six times.
  steps=$(python3 -c "print(max(200, int(0.8 * float('$rate') * $TRAIN_SECONDS / $BATCH) // 100 * 100))")
  every=$((steps / 6 / 50 * 50 > 50 ? steps / 6 / 50 * 50 : 50))
  echo "probe: $rate crops/s -> $steps steps of batch $BATCH, validated every $every" | tee -a "$logs/machine.txt"
  local run_dir=/tmp/gpu_$CONFIG
  # Stopped by SIGINT if slower than the probe said (the run keeps its best checkpoint), in time
  # for the checkpoints to be packed before the call's limit.
  left=$((CALL_SECONDS - (SECONDS - started) - 30))
  timeout --signal=INT "$left" "${train[@]}" --out-dir "$run_dir" --steps "$steps" --val-every "$every" 2>&1 \
    | tee "$logs/train.log" || echo "training ended early (status $?)" | tee -a "$logs/train.log"
  cp "$run_dir/log.jsonl" "$logs/" || true
  python3 - "$run_dir" <<'EOF' || echo "no checkpoint to send" | tee -a "$logs/train.log"
import sys
from pathlib import Path

import torch

run = Path(sys.argv[1])
def half(state):
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
best = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
torch.save({**best, "ema": half(best["ema"])}, "/tmp/best16.pt")
last = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
torch.save({"ema": half(last["ema"]), "step": last["step"], "args": best["args"],
            "trained_on": best["trained_on"]}, "/tmp/final16.pt")
print(f"best: step {best['step']}, val Dice {best['val_dice']:.4f}; final: step {last['step']}")
EOF
  tar -C "$logs" -cf "$OUT/logs.tar" .
  split -b 15M -d /tmp/best16.pt "$OUT/best.pt.part"
  split -b 15M -d /tmp/final16.pt "$OUT/final.pt.part"
  ls -la "$OUT"
}

unpack() {
  local from=${1:?give the folder the device run files came back to}
  local python=${PYTHON:-.venv/bin/python}
  local logs config dest
  logs=$(mktemp -d)
  tar -C "$logs" -xf "$from/logs.tar"
  config=$(sed -n 's/^config \([^,]*\),.*/\1/p' "$logs/machine.txt")
  dest=runs/gpu_${config:-$CONFIG}
  mkdir -p "$dest" "${dest}_final"
  cp "$logs"/* "$dest"/
  cat "$from"/best.pt.part* > "$logs/best16.pt"
  cat "$from"/final.pt.part* > "$logs/final16.pt"
  # The weights travelled as float16; the export reads float32.
  "$python" - "$logs/best16.pt" "$dest/best.pt" "$logs/final16.pt" "${dest}_final/best.pt" <<'EOF'
import sys

import torch

for source, target in zip(sys.argv[1::2], sys.argv[2::2]):
    state = torch.load(source, map_location="cpu", weights_only=False)
    state["ema"] = {k: v.float() if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, target)
    print(f"{target}: step {state['step']}")
EOF
  echo "export each with:"
  echo "  sam2unet train --out-dir $dest --export-only --data-root \$SAM2UNET_DATA --export $dest/model.onnx"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  unpack) shift; unpack "$@" ;;
  *) echo "usage: bash scripts/gpu_train.sh pack | run | unpack DIR"; exit 2 ;;
esac
