"""Old import paths of the QNN modules, kept while cli.py still names them: the runtime is now
backends/qnn_runtime.py, the build tools are convert/qnn_build.py, qnn_rewrite.py, qnn_slices.py."""

import sys

from ..backends import qnn_runtime as runtime
from ..convert import qnn_build as build

sys.modules[f"{__name__}.runtime"] = runtime
sys.modules[f"{__name__}.build"] = build
