"""The soak benchmark, small: many rounds of segment + refine + write in one process stay correct.

Memory figures are the benchmark's job (benchmarks/bench_soak.py prints them); here the same
code runs 60 slices per path so it cannot rot, and what a user relies on is asserted: every
round gives the same result, nothing but the output is left on disk, the cache holds one entry
per distinct crop.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_soak  # noqa: E402


def test_soak_rounds_repeat_their_results_and_leave_only_the_output(tmp_path, brightness_card):
    image = bench_soak.phantom(tmp_path / "phantom.nii.gz", shape=(48, 48, 20))
    out = tmp_path / "out"
    out.mkdir()
    cli = bench_soak.soak_cli(image, brightness_card, out, slices=60, per_round=6)
    assert cli["slices"] == 60 and min(cli["voxels"]) > 0
    assert cli["voxels"][0::5] == [cli["voxels"][0]] * len(cli["voxels"][0::5])  # same boxes, same masks
    assert cli["files"] == ["soak_cli.json", "soak_cli.nii.gz"]
    widget = bench_soak.soak_widget(image, brightness_card, slices=60, per_round=6)
    assert widget["voxels"] == cli["voxels"]  # the widget's path segments what the CLI's does
    assert widget["cache_entries"] == 5 * 6  # 5 box positions x 6 slices: repeats come from the cache
    print(f"cli slope {bench_soak.slope_mb_per_100(cli['samples']):+.2f} MiB/100 slices, "
          f"widget {bench_soak.slope_mb_per_100(widget['net']):+.2f} without its cache")
