"""The sdist builds a wheel that pip installs, and the installed package works (issue 12)."""

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("hatchling") is None,
                    reason="needs hatchling (the [testing] extra) to build without the network")
def test_the_sdist_installs_with_pip_and_the_installed_plugin_finds_its_manifest_and_model(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (sdist,) = tmp_path.glob("napari_sam2unet-*.tar.gz")
    with tarfile.open(sdist) as archive:
        assert any(name.endswith("/napari.yaml") and name.count("/") == 1 for name in archive.getnames())
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-index", "--target", str(target), str(sdist)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    manifest = target / "napari_sam2unet" / "napari.yaml"
    assert manifest.is_file() and not manifest.is_symlink()
    check = ("import napari_sam2unet, npe2; from napari_sam2unet.models import find_model; "
             "print(napari_sam2unet.__file__); "
             "print(npe2.PluginManifest.from_file(napari_sam2unet.__path__[0] + '/napari.yaml').name); "
             "print(find_model().file)")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-2000:]
    where, name, model = run.stdout.split()
    assert where.startswith(str(target)) and name == "napari-sam2unet"
    assert model.startswith(str(target)) and Path(model).is_file()
