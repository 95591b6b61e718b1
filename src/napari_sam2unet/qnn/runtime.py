"""Old path of backends/qnn_runtime.py (the same module), kept while cli.py names it."""

import sys

from ..backends import qnn_runtime

sys.modules[__name__] = qnn_runtime
