"""Environment check: versions, device, Mamba kernels, free disk and memory.

Usage:
    python -m mamba_asr.check_env                 # exit 1 when a requirement is missing/wrong
    python -m mamba_asr.check_env --requirements requirements.txt
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIN_PYTHON = (3, 10)
_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)")


def pinned_requirements(path: Path) -> dict[str, str]:
    """``name -> version`` for every ``name==version`` line of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def _public(version: str) -> str:
    """Drop the local part: '2.11.0+cu130' -> '2.11.0'."""
    return version.split("+", 1)[0]


def check_packages(pins: dict[str, str]) -> tuple[list[str], list[str]]:
    """Report lines and error messages for the pinned packages."""
    lines, errors = [], []
    for name, wanted in pins.items():
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            errors.append(f"required package {name}=={wanted} is not installed")
            lines.append(f"{name:<16} MISSING (need {wanted})")
            continue
        ok = _public(found) == _public(wanted)
        lines.append(f"{name:<16} {found}" + ("" if ok else f"  (need {wanted})"))
        if not ok:
            errors.append(f"{name} {found} is installed but the recipes are pinned to {wanted}")
    return lines, errors


def pick_device() -> str:
    """The device the recipes use by default: CUDA, then Apple MPS, then CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _available_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def report(requirements: Path) -> tuple[list[str], list[str]]:
    """All report lines and all errors (empty when the environment is usable)."""
    lines = [f"python           {platform.python_version()} ({sys.executable})"]
    errors = []
    if sys.version_info < MIN_PYTHON:
        errors.append(f"Python {'.'.join(map(str, MIN_PYTHON))} or newer is required")
    if requirements.is_file():
        pkg_lines, pkg_errors = check_packages(pinned_requirements(requirements))
        lines += pkg_lines
        errors += pkg_errors
    else:
        errors.append(f"requirements file {requirements} not found")
    if importlib.util.find_spec("torch") is not None and not any("torch " in e for e in errors):
        import torch

        device = pick_device()
        detail = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor()
        lines.append(f"device           {device} ({detail or platform.machine()})")
        lines.append(f"torch threads    {torch.get_num_threads()}")
        lines += _kernel_lines(device)
    disk = shutil.disk_usage(REPO)
    lines.append(f"free disk        {disk.free / 2**30:.1f} GiB ({REPO})")
    mem = _available_memory_gib()
    lines.append(f"free memory      {'unknown' if mem is None else f'{mem:.1f} GiB'}")
    return lines, errors


def _kernel_lines(device: str) -> list[str]:
    """Whether the CUDA kernels import, which scan / causal-conv path the layers run on
    ``device``, and why ``auto`` falls back to PyTorch there if a kernel install is broken."""
    from modules.mamba.selective_scan_interface import NOT_INSTALLED, kernel_status

    status = kernel_status(device)

    def shown(state: str) -> str:
        if state == NOT_INSTALLED:
            return "not installed (optional, CUDA only: pip install -r requirements-cuda.txt)"
        return state

    lines = [
        f"mamba-ssm        {shown(status['mamba_ssm'])}",
        f"causal-conv1d    {shown(status['causal_conv1d'])}",
        f"selective scan   {status['scan']}",
        f"causal conv      {status['conv']}",
    ]
    return lines + [f"WARNING          {status[k]}" for k in ("scan_warning", "conv_warning")
                    if status[k]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the Mamba-ASR environment.")
    parser.add_argument(
        "--requirements", type=Path, default=REPO / "requirements.txt", help="pinned stack"
    )
    args = parser.parse_args(argv)
    lines, errors = report(args.requirements)
    print("\n".join(lines))
    if errors:
        print("\nenvironment check FAILED:", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        print("fix: .venv/bin/pip install -r requirements.txt (or `make install`)", file=sys.stderr)
        return 1
    print("\nenvironment OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
