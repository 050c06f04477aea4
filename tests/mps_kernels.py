"""Apple MPS support checked on any machine: which operators run, and whether MPS has them.

:class:`OpRecorder` collects the aten operators (and tensor dtypes) that run under it;
:func:`mps_kernel` looks an operator up in torch's own operator registry
(``native_functions.yaml``, shipped with torch in ``torchgen``): an operator runs on MPS when
its dispatch table names MPS or a device-generic composite, directly or through the
operator it delegates to. A composite's own inner calls are not recorded (they run below the
recorder), so those are trusted to be device-generic as torch declares them.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torchgen
from conftest import REPO
from torch.utils._python_dispatch import TorchDispatchMode

GENERIC = {"CompositeExplicitAutograd", "CompositeImplicitAutograd",
           "CompositeExplicitAutogradNonFunctional"}
# Operators the recipes run on the CPU for tensors on MPS (mamba_asr.losses.ctc_loss).
ON_CPU_FOR_MPS = {"aten::_ctc_loss.Tensor", "aten::_ctc_loss_backward.Tensor"}
# Tensor dtypes MPS supports (no float64).
MPS_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


class OpRecorder(TorchDispatchMode):
    """Records ``ops`` ("aten::mul.out", ...) and the ``dtypes`` of their tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        self.ops.add(func.name())
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


@functools.cache
def _registry() -> dict[str, str]:
    """native_functions.yaml as {"name.overload": its entry's text}."""
    path = Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
    entries = {}
    for block in re.split(r"\n(?=- func: )", path.read_text()):
        match = re.match(r"- func: ([\w.]+)\(", block)
        if match:
            entries[match.group(1)] = block
    return entries


def _dispatch_keys(entry: str) -> set[str] | None:
    """The dispatch keys of a registry entry (None: no dispatch table)."""
    match = re.search(r"\n  dispatch:\n((?:    .*\n?)+)", entry)
    if not match:
        return None
    return {key.strip() for line in match.group(1).splitlines()
            for key in line.split(":")[0].split(",")}


def mps_kernel(op: str) -> bool | str:
    """True if the aten operator ``op`` ("aten::addcmul_", "aten::mul.out") runs on MPS,
    else why not."""
    name = op.removeprefix("aten::").removesuffix(".default")
    entry = _registry().get(name)
    if entry is None:
        return f"{op} is not in torch's operator registry"
    keys = _dispatch_keys(entry)
    if keys is not None and ("MPS" in keys or keys & GENERIC):
        return True
    delegate = re.search(r"structured_delegate: ([\w.]+)", entry)
    if delegate:
        return mps_kernel(f"aten::{delegate.group(1)}")
    if keys is None:
        return True  # no table: a composite of other operators
    return f"{op} has kernels for {', '.join(sorted(keys))} only"


def without_mps(ops: set[str]) -> dict[str, str]:
    """The aten operators of ``ops`` that MPS lacks, with why."""
    found = {op: mps_kernel(op) for op in ops if op.startswith("aten::")}
    return {op: why for op, why in found.items() if why is not True}


def assert_mps_ready(recorded: dict) -> None:
    """Recipe batches recorded by ``record_ops.py``: every operator runs on MPS (or on the
    CPU for MPS tensors), and no tensor is float64."""
    ops = set(recorded["ops"])
    assert ON_CPU_FOR_MPS <= ops and "aten::addcmul_" in ops and len(ops) > 80
    assert without_mps(ops - ON_CPU_FOR_MPS) == {}
    assert "float64" not in recorded["dtypes"], recorded["dtypes"]


def record_recipe(script: str, args: list[str], folder: Path) -> dict:
    """Run the recipe ``script`` (e.g. "train_CTC.py") with ``args`` under ``record_ops.py``;
    its recorded {"ops", "dtypes"}."""
    out = folder / "ops.json"
    cmd = [sys.executable, str(REPO / "tests" / "record_ops.py"), str(out), script, *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())
