"""The environment check reports versions and fails clearly on a wrong stack."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from mamba_asr import check_env


def test_passes_on_this_environment():
    res = subprocess.run(
        [sys.executable, "-m", "mamba_asr.check_env"], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    import torch

    assert f"torch            {torch.__version__.split('+')[0]}" in res.stdout
    assert "speechbrain      1.1.2" in res.stdout
    assert f"device           {check_env.pick_device()}" in res.stdout
    assert "selective scan" in res.stdout and "free disk" in res.stdout


def test_missing_and_wrong_versions_fail(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("numpy==0.0.1\nno-such-package-xyz==1.0  # comment\nscipy>=1\n")
    assert check_env.pinned_requirements(req) == {"numpy": "0.0.1", "no-such-package-xyz": "1.0"}
    res = subprocess.run(
        [sys.executable, "-m", "mamba_asr.check_env", "--requirements", str(req)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "numpy" in res.stderr and "pinned to 0.0.1" in res.stderr
    assert "no-such-package-xyz==1.0 is not installed" in res.stderr


def test_local_version_suffix_is_ignored():
    lines, errors = check_env.check_packages(
        {"torch": check_env._public(__import__("torch").__version__)}
    )
    assert errors == [] and lines[0].startswith("torch")
