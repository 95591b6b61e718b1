#!/usr/bin/env bash
# Installs everything the tests need (Debian packages, .venv) and runs them under a virtual X server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check src tests benchmarks
xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest "$@"
