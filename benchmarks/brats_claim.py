"""The BraTS claim: SAM2-UNet against a plain U-Net, trained the same way, on BraTS 2013.

Trains `--arch sam2unet --config compact` and `--arch unet` from scratch with the identical
recipe and step budget on benchmarks/brats2013_claim.yaml (train: patients 1-2, validation:
patient 3, test: patient 4, FLAIR and T1c of a patient in the same split), exports both, and
scores both with `sam2unet eval` on the test patient. docs/performance.md, section 3, "The
BraTS claim", reports one run of this.

    export SAM2UNET_DATA=../shared/data
    nice -n 19 .venv/bin/python benchmarks/brats_claim.py --steps 500 --out runs/brats_claim

The two trainings run side by side (one torch thread each) unless --serial is given. BraTS 2013
is CC BY-NC-SA: these weights are for measuring only and are never shipped. `--eval-only`
scores the exports of an earlier call.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent / "brats2013_claim.yaml"
ARCHS = {"sam2unet": ["--arch", "sam2unet", "--config", "compact"], "unet": ["--arch", "unet"]}


def sam2unet(*args: str) -> list[str]:
    return [sys.executable, "-m", "napari_sam2unet.cli", *args]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--out", default="runs/brats_claim", help="one run folder per architecture here")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--serial", action="store_true", help="train one after the other")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--protocol", action="append", default=None,
                   help="eval protocols (repeat; default: all four)")
    args = p.parse_args(argv)
    out = Path(args.out)
    onnx = {arch: out / arch / f"brats-{arch}.onnx" for arch in ARCHS}
    if not args.eval_only:
        procs = []
        for arch, flags in ARCHS.items():
            cmd = sam2unet("train", *flags, "--data", str(MANIFEST), "--out-dir", str(out / arch),
                           "--steps", str(args.steps), "--threads", str(args.threads),
                           "--export", str(onnx[arch]), "--name", f"brats-{arch}")
            print(" ".join(cmd), flush=True)
            (out / arch).mkdir(parents=True, exist_ok=True)
            log = open(out / f"{arch}.log", "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            if args.serial:
                proc.wait()
            procs.append(proc)
        if any(proc.wait() for proc in procs):
            print(f"a training failed; see {out}/*.log", file=sys.stderr)
            return 1
    cmd = sam2unet("eval", "--data", str(MANIFEST), "--split", "test",
                   *[a for arch in ARCHS for a in ("--model", str(onnx[arch]))],
                   *[a for proto in (args.protocol or []) for a in ("--protocol", proto)],
                   "--threads", str(max(1, args.threads)),
                   "--json", str(out / "test_eval.json"), "--markdown", str(out / "test_eval.md"))
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
