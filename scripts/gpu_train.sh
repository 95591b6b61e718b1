#!/usr/bin/env bash
# Train a larger bundled-model candidate on a lent GPU machine in one call (issue 10, item 6).
#
#   bash scripts/gpu_train.sh pack            # here: data, manifest and wheels into .gpu/ (ignored)
#   device run, carry [".gpu"], timeout_s 590:
#       bash scripts/gpu_train.sh run          # there: probe, train, checkpoint in parts into $OUT
#   bash scripts/gpu_train.sh unpack DIR      # here: DIR = the run's files_at; rebuilds runs/gpu_<config>
#
# The machine has PyTorch but not nibabel (carried as a wheel) nor ../shared (the manifest's
# train cases and the smaller validation cases travel in .gpu/data, with the manifest's own
# relative paths). Everything that travels must stay under 64 MiB together with the repository,
# so validation there uses the three smallest validation cases; score the result here on all of
# them. Files come back at most 16 MiB each, so best.pt returns in 15 MiB parts.
# Environment: CONFIG (medium), CHANNELS (prompted: the model sees clicks and a prior, as the
# bundled one does), BATCH (32), WORKERS (14), TRAIN_SECONDS (390), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-medium}
CHANNELS=${CHANNELS:-prompted}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-14}
TRAIN_SECONDS=${TRAIN_SECONDS:-390}
SEED=${SEED:-0}
SMALL_VALIDATION="itksnap_mricrop deeplesion_000001 deeplesion_000002"

pack() {
  local python=${PYTHON:-.venv/bin/python}
  : "${SAM2UNET_DATA:?set SAM2UNET_DATA to the data folder the bundled manifest reads (../shared/data)}"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu/data .gpu/wheels
  "$python" - "$SMALL_VALIDATION" <<'EOF'
import os, shutil, sys
from pathlib import Path

import yaml

from napari_sam2unet.training.datasets import default_manifest, find_cases

keep_validation = set(sys.argv[1].split())
root = Path(os.environ["SAM2UNET_DATA"]).resolve()
manifest = yaml.safe_load(default_manifest().read_text())
chosen = {c.name for c in find_cases([default_manifest()], "train")
          if c.split == "train" or (c.split == "validation" and c.name in keep_validation)}
manifest["cases"] = [entry for entry in manifest["cases"] if entry["name"] in chosen]
copied = 0
for case in find_cases([default_manifest()], "train"):
    if case.name not in chosen:
        continue
    for file in case.files():
        target = Path(".gpu/data") / Path(file).resolve().relative_to(root)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
            copied += target.stat().st_size
Path(".gpu/manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
print(f"packed {len(chosen)} cases, {copied / 2**20:.1f} MiB")
EOF
  version=$("$python" -c "import nibabel; print(nibabel.__version__)")
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/wheels "nibabel==$version"
  local tree carried
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  carried=$(du -sb .gpu | cut -f1)
  echo "travels: repository $((tree / 2**20)) MiB + .gpu $((carried / 2**20)) MiB (limit 64 MiB)"
  [ $((tree + carried)) -lt $((64 * 2**20)) ] || { echo "over the 64 MiB limit: carry less"; exit 1; }
}

run() {
  : "${OUT:?run this on the device machine, where OUT is set}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src SAM2UNET_DATA=$PWD/.gpu/data PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$OUT/machine.txt"
  echo "config $CONFIG, channels $CHANNELS" >> "$OUT/machine.txt"
  echo "cores $(nproc)" >> "$OUT/machine.txt"
  local train=(python3 -m napari_sam2unet.cli train --config "$CONFIG" --channels "$CHANNELS" --data .gpu/manifest.yaml
    --batch "$BATCH" --workers "$WORKERS" --seed "$SEED" --val-crops 96)
  # A short probe measures crops per second with this many workers; the run is sized to fit.
  "${train[@]}" --out-dir /tmp/probe --steps 60 --warmup 10 --val-every 1000 --log-every 20 2>&1 | tee "$OUT/probe.log"
  local rate steps
  rate=$(grep -o '[0-9.]* crops/s' "$OUT/probe.log" | tail -1 | cut -d' ' -f1)
  steps=$(python3 -c "print(max(200, int(float('$rate') * $TRAIN_SECONDS / $BATCH) // 100 * 100))")
  echo "probe: $rate crops/s -> $steps steps of batch $BATCH" | tee -a "$OUT/machine.txt"
  local run_dir=/tmp/gpu_$CONFIG
  # Stopped by SIGINT if slower than the probe said: the run keeps its best checkpoint.
  timeout --signal=INT $((TRAIN_SECONDS + 120)) "${train[@]}" --out-dir "$run_dir" --steps "$steps" \
    --val-every 250 2>&1 | tee "$OUT/train.log" || echo "training ended early (status $?)" | tee -a "$OUT/train.log"
  cp "$run_dir/log.jsonl" "$OUT/log.jsonl"
  split -b 15M -d "$run_dir/best.pt" "$OUT/best.pt.part"
  ls -la "$OUT"
}

unpack() {
  local from=${1:?give the folder the device run files came back to}
  local config
  config=$(sed -n 's/^config //p' "$from/machine.txt")
  local dest=runs/gpu_${config:-$CONFIG}
  mkdir -p "$dest"
  cat "$from"/best.pt.part* > "$dest/best.pt"
  cp "$from"/*.log "$from"/log.jsonl "$from"/machine.txt "$dest"/ 2>/dev/null || true
  echo "rebuilt $dest/best.pt; export it with:"
  echo "  sam2unet train --out-dir $dest --export-only --data-root \$SAM2UNET_DATA --export $dest/model.onnx"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  unpack) shift; unpack "$@" ;;
  *) echo "usage: bash scripts/gpu_train.sh pack | run | unpack DIR"; exit 2 ;;
esac
