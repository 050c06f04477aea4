"""Run a recipe script and record the operators its training and evaluation batches run.

    python tests/record_ops.py OUT.json train_CTC.py hparams/CTC/demo.yaml --data_folder ...

Every ``Brain.fit_batch`` and ``Brain.evaluate_batch`` (forward, loss, backward, optimizer
step, decoding: what runs on the training device) is recorded with
:class:`mps_kernels.OpRecorder`; OUT.json gets ``{"ops": [...], "dtypes": [...]}`` at exit.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
from pathlib import Path

import speechbrain as sb
from mps_kernels import OpRecorder

OPS: set[str] = set()
DTYPES: set[str] = set()


def _recorded(method):
    def run(self, *args, **kwargs):
        recorder = OpRecorder()
        try:
            with recorder:
                return method(self, *args, **kwargs)
        finally:
            OPS.update(recorder.ops)
            DTYPES.update(str(d).removeprefix("torch.") for d in recorder.dtypes)
    return run


def main() -> None:
    out, script, *args = sys.argv[1:]
    for name in ("fit_batch", "evaluate_batch"):
        setattr(sb.Brain, name, _recorded(getattr(sb.Brain, name)))
    atexit.register(lambda: Path(out).write_text(
        json.dumps({"ops": sorted(OPS), "dtypes": sorted(DTYPES)})))
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
