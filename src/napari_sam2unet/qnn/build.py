"""Old path of convert/qnn_build.py (the same module), kept while cli.py names it."""

import sys

from ..convert import qnn_build

sys.modules[__name__] = qnn_build
