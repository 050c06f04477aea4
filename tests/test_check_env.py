"""The environment check reports versions and fails clearly on a wrong stack."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_selective_scan import NO_CUDART, UNDEFINED_SYMBOL, broken_kernel_packages

from mamba_asr import check_env


def test_passes_on_this_environment():
    res = subprocess.run(
        [sys.executable, "-m", "mamba_asr.check_env"], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert f"torch            {torch.__version__.split('+')[0]}" in res.stdout
    assert "speechbrain      1.1.2" in res.stdout
    # What torch says about this machine, in the recipes' order of preference.
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = "mps" if torch.backends.mps.is_available() else "cpu"
    assert f"device           {device}" in res.stdout
    assert "selective scan" in res.stdout and "free disk" in res.stdout


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu"),
])
def test_pick_device_prefers_cuda_then_mps(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert check_env.pick_device() == expected


def test_kernel_lines_report_a_broken_kernel_install(monkeypatch, tmp_path):
    """Installed kernels whose import raises: the package lines give the error on any device;
    on CUDA, where ``auto`` would have run them, the warning the layers log is printed too."""
    broken_kernel_packages(monkeypatch, tmp_path)
    cpu = check_env._kernel_lines("cpu")
    assert cpu == [
        f"mamba-ssm        installed, but its import fails (ImportError: {UNDEFINED_SYMBOL})",
        f"causal-conv1d    installed, but its import fails (OSError: {NO_CUDART})",
        "selective scan   PyTorch chunked parallel scan",
        "causal conv      PyTorch conv1d",
    ]
    cuda = check_env._kernel_lines("cuda")
    assert cuda[:4] == cpu
    assert len(cuda) == 6
    assert cuda[4].startswith(f"WARNING          mamba-ssm is installed but fails to import "
                              f"(ImportError: {UNDEFINED_SYMBOL}), so CUDA tensors run the "
                              f"PyTorch chunked parallel scan")
    assert cuda[5].startswith(f"WARNING          causal-conv1d is installed but fails to import "
                              f"(OSError: {NO_CUDART})")
    assert all("pip install -r requirements-cuda.txt --no-build-isolation" in line
               and "MAMBA_ASR_SCAN_IMPL=torch" in line for line in cuda[4:])


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
