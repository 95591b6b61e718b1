"""Cohort throughput: `sam2unet batch` with 1 and 2 Dask workers against a loop of `sam2unet segment` processes.

Every case is a real scan from ../shared/data with a box on each slice its structure touches (taken
from its label map, as the manifest's boxes_from column does). Prints cases per minute, the
cluster's start-up, a resumed run (every case skipped) and the peak memory of each worker process
(of each `segment` process for the loop); --markdown prints the table for docs/cohorts.md.
Run: python benchmarks/bench_cohort.py [--model NAME|PATH] [--copies 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from napari_sam2unet.batch import run_batch
from napari_sam2unet.manifest import boxes_from_labels

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# (case, image, label map, label): MR and CT abdomen, brain MR, fetal MR, a glioma crop.
CASES = [
    ("mr_liver", "totalseg/example_mr_sm.nii.gz", "totalseg/example_seg_mr.nii.gz", 5),
    ("ct_liver", "totalseg/example_ct_sm.nii.gz", "totalseg/example_seg.nii.gz", 5),
    ("brain_ventricles", "cases/itksnap_mricrop_brain/image.nii.gz", "cases/itksnap_mricrop_brain/label.nii.gz", 1),
    ("edema", "cases/brats2021_01646_flair_edema/image.nii.gz", "cases/brats2021_01646_flair_edema/label.nii.gz", 1),
    *[(f"fetal_brain_{n}", f"cases/mial_fetal_brain_run{n}/image.nii.gz",
       f"cases/mial_fetal_brain_run{n}/label.nii.gz", 1) for n in range(1, 5)],
]


def write_manifest(path: Path, copies: int) -> list[dict]:
    rows = [{"case": f"{name}_{copy}", "image": str(SHARED / image), "boxes_from": str(SHARED / seg), "label": label}
            for copy in range(copies) for name, image, seg, label in CASES]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def segment_loop(rows: list[dict], out: Path, model: str | None) -> tuple[float, float]:
    """(seconds, peak MiB of one process) for one `sam2unet segment` process per case."""
    out.mkdir()
    command = [str(Path(sys.executable).with_name("sam2unet")), "segment"]
    began = time.perf_counter()
    for row in rows:
        boxes = [f"{b.slice}:{b.i0!r},{b.j0!r},{b.i1!r},{b.j1!r}"
                 for b in boxes_from_labels(Path(row["boxes_from"]), row["label"], axis=2)]
        args = [row["image"], "--out", str(out / f"{row['case']}.nii.gz"), "--label", str(row["label"]), "-q",
                *[a for box in boxes for a in ("--box", box)], *(["--model", model] if model else [])]
        subprocess.run(command + args, check=True)
    seconds = time.perf_counter() - began
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_run(manifest: Path, out: Path, model: str | None, workers: int, threads: int) -> dict:
    """A LocalCluster as `sam2unet batch` starts it; timed start-up, run, resumed run, peak memory."""
    from distributed import Client, LocalCluster

    began = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as cluster, Client(cluster) as client:
        started = time.perf_counter()
        report = run_batch(manifest, out, model=model, threads_per_worker=threads, client=client)
        assert not report.failed, report.failed
        ran = time.perf_counter()
        resumed = run_batch(manifest, out, model=model, threads_per_worker=threads, client=client)
        assert resumed.counts["skipped"] == len(resumed.rows)
        peaks = sorted(client.run(peak_rss_mib).values())
        return {"startup": started - began, "seconds": ran - started, "resume": time.perf_counter() - ran,
                "peaks": peaks, "cases": len(report.rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model name or path (default: bundled)")
    parser.add_argument("--copies", type=int, default=2, help="each case this many times (a bigger cohort)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench_cohort."))
    try:
        manifest = work / "cohort.csv"
        rows = write_manifest(manifest, args.copies)
        loop_seconds, loop_peak = segment_loop(rows, work / "loop", args.model)
        results = [("loop of `sam2unet segment` processes", {"seconds": loop_seconds, "startup": 0.0,
                                                              "resume": None, "peaks": [loop_peak]})]
        for workers in (1, 2):
            threads = max(1, cores // workers)
            stats = batch_run(manifest, work / f"batch{workers}", args.model, workers, threads)
            results.append((f"batch, {workers} worker(s) x {threads} thread(s)", stats))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, len(rows), cores, args.markdown)


def print_table(results, cases: int, cores: int, markdown: bool) -> None:
    header = ("run", "cases/min", "run s", "cluster start s", "resume (all skipped) s", "peak MiB per process")
    lines = []
    for name, stats in results:
        resume = "-" if stats["resume"] is None else f"{stats['resume']:.1f}"
        lines.append((name, f"{60 * cases / stats['seconds']:.1f}", f"{stats['seconds']:.1f}",
                      f"{stats['startup']:.1f}", resume, ", ".join(f"{p:.0f}" for p in stats["peaks"])))
    print(f"{cases} cases on {cores} cores")
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        for line in [header, *lines]:
            print("  ".join(f"{cell:>22}" if i else f"{cell:<40}" for i, cell in enumerate(line)))


if __name__ == "__main__":
    main()
