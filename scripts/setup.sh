#!/usr/bin/env bash
# Creates .venv and installs the package (and, with --test, what the tests need) on Debian/Ubuntu.
# Sourced by demo.sh and test.sh; safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_packages=(python3-venv)
if [ "$want_test" = 1 ]; then
  # A virtual X server and Mesa GL: napari's tests draw real image layers (DESIGN.md).
  apt_packages+=(xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libfontconfig1 libglib2.0-0
    libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0
    libxcb-keysyms1 libxcb-randr0 libxcb-render0 libxcb-render-util0 libxcb-shape0 libxcb-util1
    libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1)
  # dcm2niix: the reference converter the DICOM geometry tests compare against (tests/test_dicom.py).
  apt_packages+=(dcm2niix)
fi
missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
# python3-venv is only needed when the system python lacks venv (a pyenv python has it).
if [ "${#missing[@]}" -gt 0 ] && ! { [ "${missing[*]}" = "python3-venv" ] && python3 -m venv --help >/dev/null 2>&1; }; then
  echo "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_test" = 1 ]; then
  # torch first, pinned: an unpinned torch would pull gigabytes of CUDA packages.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  extras="testing,export,cohort"
  # Qualcomm's QNN runtime and its HTP emulator for the NPU tests: wheels for x86_64 Linux, glibc >= 2.35.
  if [ "$(uname -sm)" = "Linux x86_64" ] && python3 -c 'import platform, sys
v = platform.libc_ver()[1].split(".")
sys.exit(not (v[0] and (int(v[0]), int(v[1])) >= (2, 35)))'; then
    extras="$extras,qnn"
  fi
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
