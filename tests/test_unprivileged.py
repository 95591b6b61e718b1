"""Permission tests that root passes for the wrong reason (root reads and writes anything) run
again as the unprivileged user `nobody`, so that CI running as root still proves them (issue 25)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

AS_ROOT_SKIPPED = [
    "tests/test_io.py::test_an_unreadable_file_says_permission_not_incomplete",
    "tests/test_options.py::test_read_only_outputs_are_refused_before_any_work",
    "tests/test_messages.py::test_an_input_in_a_folder_the_user_cannot_search_says_permission",
    "tests/test_batch.py::test_a_read_only_out_dir_is_refused_before_anything_runs",
    "tests/test_evaluate.py::test_eval_json_into_a_read_only_folder_is_refused_before_the_evaluation",
]
NOBODY = "65534"


@pytest.mark.skipif(os.geteuid() != 0, reason="not root: the permission tests run as they are")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) drops root for the run")
def test_permission_tests_pass_as_an_unprivileged_user():
    repo = Path(__file__).resolve().parents[1]
    home = Path(tempfile.mkdtemp(prefix="sam2unet-nobody-"))  # pytest's own tmp is root's alone
    try:
        home.chmod(0o777)
        env = {**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable]
        probe = subprocess.run([*as_nobody, "-c", "import napari_sam2unet, pytest; open('tests/conftest.py').close()"],
                               cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        if probe.returncode:  # e.g. a clone or Python under /root, which only root may enter
            pytest.skip(f"nobody cannot run this checkout's tests: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
        run = subprocess.run(
            [*as_nobody, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(home / "t"),
             *AS_ROOT_SKIPPED],
            cwd=repo, env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert run.returncode == 0 and f"{len(AS_ROOT_SKIPPED)} passed" in run.stdout, run.stdout[-3000:] + run.stderr
