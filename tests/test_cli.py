"""The commands users type: SpeechBrain's torchvision notice is not in their output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_asr import TORCHVISION_NOTICE

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )


def test_torchvision_notice_is_silenced(caplog: pytest.LogCaptureFixture) -> None:
    """Only that message of that logger: its other warnings pass."""
    sb_logger = logging.getLogger("speechbrain.utils.train_logger")
    with caplog.at_level(logging.WARNING):
        sb_logger.warning(TORCHVISION_NOTICE)
        sb_logger.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
    code = "import mamba_asr, speechbrain.utils.train_logger"
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert TORCHVISION_NOTICE not in proc.stderr + proc.stdout
