"""The command line that started this process, as its user would type it again.

:mod:`mamba_asr.ddp_run` tells its workers its own command line through :data:`LAUNCH_ENV`
(a worker only sees ``python -u train_CTC.py ...``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

# Set by mamba_asr.ddp_run for its workers: the launcher's command line, shell-quoted.
LAUNCH_ENV = "MAMBA_ASR_LAUNCH_COMMAND"


def python_command() -> str:
    """``python`` when that name on PATH is this interpreter, else its full path (quoted)."""
    found = shutil.which("python")
    if found is not None and os.path.abspath(found) == os.path.abspath(sys.executable):
        return "python"
    return shlex.quote(sys.executable)
