"""The command line that started this process, as its user would type it again.

Used by the recipes' Ctrl-C line ("rerun the same command to resume ...") and by
:mod:`mamba_asr.ddp_run`, which tells its workers its own command line through
:data:`LAUNCH_ENV` (a worker only sees ``python -u train_CTC.py ...``).
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


def rerun_command(argv: list[str] | None = None) -> str:
    """The command that started this process (``argv``: its ``sys.argv``): the launcher's
    command line under :mod:`mamba_asr.ddp_run`; ``torchrun ... <script> <args>`` under
    another torchrun (whose options a worker cannot see); else ``python <script> <args>``."""
    launched = os.environ.get(LAUNCH_ENV)
    if launched:
        return launched
    script = shlex.join(sys.argv if argv is None else argv)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # set by torchrun for its workers
        return f"torchrun ... {script}"
    return f"{python_command()} {script}"
