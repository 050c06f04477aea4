"""The commands users type: ``python -m mamba_asr.ddp_run``, SpeechBrain's torchvision notice.

The end-to-end tests run the CTC demo configuration on a few utterances of the demo corpus.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hyperpyyaml import load_hyperpyyaml

from mamba_asr import TORCHVISION_NOTICE, data
from mamba_asr.ddp_run import torchrun_argv
from mamba_asr.reports.curves import read_test_lines, read_train_log

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "hparams" / "CTC" / "demo.yaml"
SELECT = "[32, 8, 8, 8]"  # training, dev, test-clean, test-other utterances
N_TEST = 8


def _ctc_argv(data_folder: Path, out: Path, *extra: str, select: str = SELECT) -> list[str]:
    """train_CTC.py's arguments for a short demo run."""
    return [
        "hparams/CTC/demo.yaml", "--data_folder", str(data_folder), "--output_folder", str(out),
        "--select_n_sentences", select, "--noprogressbar", *extra,
    ]


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )


# --------------------------------------------------------------------------- command line


def test_ddp_run_passes_torchrun_options() -> None:
    script = ["train_CTC.py", "h.yaml", "--seed", "1"]
    assert torchrun_argv(["--nproc_per_node=2", *script]) == [
        "--standalone", "--nproc_per_node=2", *script
    ]
    # torch.distributed.launch's --use_env and SpeechBrain 0.5's --distributed_launch go.
    assert torchrun_argv(["--use_env", "--nproc_per_node", "2", *script, "--distributed_launch",
                          "--distributed_backend=gloo"]) == [
        "--standalone", "--nproc_per_node", "2", *script, "--distributed_backend=gloo"
    ]
    # A rendezvous given, or several nodes: exactly the options given.
    for options in (
        ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29501"],
        ["--master_port", "29502", "--nproc-per-node=2"],
        ["--rdzv_backend=c10d", "--rdzv_endpoint=host:29400", "--rdzv_id=7"],
        ["--standalone", "--nproc_per_node=4"],
    ):
        assert torchrun_argv([*options, *script]) == [*options, *script]


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


# --------------------------------------------------------------------------- ddp_run


def _n_batches(out: Path, demo_corpus: Path) -> int:
    """Training batches of one epoch in a single process (the run's prepared manifest)."""
    with open(DEMO, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(
            f, {"data_folder": str(demo_corpus), "output_folder": str(out)}
        )
    train = data.training_set(hparams)
    return len(data.dynamic_batch_sampler(train, hparams["dynamic_batch_sampler_train"]))


@pytest.fixture(scope="module")
def ddp_run(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch by ``python -m mamba_asr.ddp_run --nproc_per_node=2`` on 2 CPU processes,
    with the obsolete ``--distributed_launch`` that old guides add."""
    out = tmp_path_factory.mktemp("ddp_run") / "run"
    cmd = [
        sys.executable, "-m", "mamba_asr.ddp_run", "--nproc_per_node=2", "train_CTC.py",
        *_ctc_argv(demo_corpus, out, "--number_of_epochs", "1", "--distributed_launch"),
    ]
    proc = _run(cmd, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_ddp_run_trains_on_two_processes(ddp_run: Path, demo_corpus: Path) -> None:
    """Both processes trained half of the batches (gloo, as there is no CUDA here or the
    recipe would use it), gradients averaged; only the main process wrote."""
    half = math.ceil(_n_batches(ddp_run, demo_corpus) / 2)
    log = read_train_log(ddp_run / "train_log.txt")
    assert list(log.index) == [1]
    assert log.loc[1, "process_batches"] == f"{half} {half}"
    assert log.loc[1, "steps"] == half
    assert len(list((ddp_run / "save").glob("CKPT+*"))) == 1
    tests = read_test_lines(ddp_run / "train_log.txt")
    assert list(tests["test set"]) == ["test-clean", "test-other"]
    assert (tests["test utterances"] == N_TEST).all()
