"""Engine choices on the VALIDATION split only: threshold, crop margin, smallest crop, box regions.

    SAM2UNET_DATA=../shared/data python benchmarks/choose_engine.py [--model NAME] [--only NAME]

Every variant runs `sam2unet eval`'s code on the bundled manifest's validation patients (never
the test split). Prints one line per variant: mean 3D Dice per protocol.
"""

from __future__ import annotations

import argparse
import json
import time

from napari_sam2unet import engine, postprocess, preprocess, propagation
from napari_sam2unet.training.datasets import default_manifest, find_cases
from napari_sam2unet.training.evaluate import PROTOCOLS, evaluate


def variants():
    """(name, settings): each changes one engine choice from today's defaults."""
    yield "defaults", {}
    for threshold in (0.3, 0.4, 0.6):
        yield f"threshold {threshold}", {"threshold": threshold}
    for margin in (0.0, 0.05, 0.3, 0.5):
        yield f"margin {margin}", {"margin": margin}
    for pixels in (12, 16):
        yield f"min crop {pixels} px", {"min_crop": pixels}
    for rule in ("all", "largest"):
        yield f"box regions {rule}", {"regions": rule}
    for overlap in (0.6, 0.7, 0.9):
        yield f"propagation overlap {overlap}", {"overlap": overlap}
    for most in (1.2, 1.5, 100.0):
        yield f"propagation max growth {most}", {"max_growth": most}
    for growth in (0.0, 0.1):
        yield f"propagation growth {growth}", {"growth": growth}
    yield "flip average", {"flip": True}


def run(model, settings, cases, protocols):
    saved = (preprocess.MIN_CROP_PIXELS, postprocess.BOX_REGIONS, propagation.PROPAGATE_MIN_OVERLAP,
             propagation.PROPAGATE_GROWTH, propagation.PROPAGATE_MAX_GROWTH)
    preprocess.MIN_CROP_PIXELS = settings.get("min_crop", saved[0])
    postprocess.BOX_REGIONS = settings.get("regions", saved[1])
    propagation.PROPAGATE_MIN_OVERLAP = settings.get("overlap", saved[2])  # engines built from now on take it
    propagation.PROPAGATE_GROWTH = settings.get("growth", saved[3])
    propagation.PROPAGATE_MAX_GROWTH = settings.get("max_growth", saved[4])
    init = engine.Engine.__init__
    if settings.get("flip"):
        def flipped_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.flip_average = True
        engine.Engine.__init__ = flipped_init
    try:
        return evaluate(cases, [model], margin=settings.get("margin"), threshold=settings.get("threshold"),
                        protocols=protocols, baseline=False, threads=2)
    finally:
        engine.Engine.__init__ = init
        (preprocess.MIN_CROP_PIXELS, postprocess.BOX_REGIONS, propagation.PROPAGATE_MIN_OVERLAP,
         propagation.PROPAGATE_GROWTH, propagation.PROPAGATE_MAX_GROWTH) = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--only", action="append", default=None, help="run only variants whose name starts so")
    parser.add_argument("--protocol", action="append", choices=PROTOCOLS, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cases = [c for c in find_cases([default_manifest()], "validation") if c.split == "validation"]
    protocols = tuple(args.protocol or PROTOCOLS)
    out = {}
    for name, settings in variants():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        began = time.perf_counter()
        report = run(args.model, settings, cases, protocols)
        (method,) = report["summary"]
        means = {p: report["summary"][method][p]["mean"] for p in protocols}
        out[name] = means
        cells = "  ".join(f"{p} {v:.3f}" for p, v in means.items())
        print(f"{name:22s} {cells}  ({len(report['cases'])} structures, {time.perf_counter() - began:.0f} s)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
