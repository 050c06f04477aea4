"""The commands users type: ``--resume``, ``python -m mamba_asr.ddp_run``, Ctrl-C, errors found
before a run starts (nothing left behind), an option given twice, SpeechBrain's torchvision
notice.

The end-to-end tests run the CTC demo configuration on a few utterances of the demo corpus.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, assert_two_process_epoch, train_batches
from hyperpyyaml import load_hyperpyyaml
from ruamel.yaml import YAML

import train_CTC
import train_LM
import train_S2S
from librispeech_prepare import LibriSpeechPrepError
from mamba_asr import TORCHVISION_NOTICE
from mamba_asr.checkpoints import AtomicCheckpointer
from mamba_asr.commands import LAUNCH_ENV, python_command, rerun_command
from mamba_asr.config import ConfigError, PrecisionError, split_command_line
from mamba_asr.ddp_run import torchrun_argv
from mamba_asr.reports.curves import read_test_lines, read_train_log
from mamba_asr.resume import RESUME_MARKER, newest_checkpoint, pending_resume

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


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The last line of stderr, after checking: exit status 2, no traceback, no torchvision
    notice."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and TORCHVISION_NOTICE not in output
    return proc.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- command line


def test_split_command_line_resume_and_repeated_options() -> None:
    argv = ["h.yaml", "--resume", "a/CKPT+1", "a/CKPT+2", "--number_of_epochs", "3"]
    rest, patterns = split_command_line(argv)
    assert rest == ["h.yaml", "--number_of_epochs", "3"]
    assert patterns == ["a/CKPT+1", "a/CKPT+2"]
    assert split_command_line(["h.yaml", "--resume=s/CKPT+*"]) == (["h.yaml"], ["s/CKPT+*"])
    assert split_command_line(["h.yaml", "--resume_from", "c"]) == (
        ["h.yaml", "--resume_from", "c"], None
    )
    errors = {
        "--batch_size is given twice on the command line (8, then 4): give it once":
            ["h.yaml", "--batch_size", "8", "--batch_size=4"],
        "--noprogressbar is given twice on the command line: give it once":
            ["h.yaml", "--noprogressbar", "--noprogressbar"],
        "--resume_from needs a checkpoint folder": ["h.yaml", "--resume_from", "--seed", "1"],
        "--resume needs a checkpoint folder or a pattern": ["h.yaml", "--resume", "--seed", "1"],
        "--resume and --resume_from both": ["h.yaml", "--resume", "a", "--resume_from", "b"],
        "--resume is given twice": ["h.yaml", "--resume", "a", "--resume", "b"],
    }
    for message, argv in errors.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            split_command_line(argv)
    for argv in (["h.yaml", "--resume_from"], ["h.yaml", "--resume_from="]):
        with pytest.raises(ConfigError, match="would start afresh"):
            split_command_line(argv)


def test_newest_complete_checkpoint(tmp_path: Path) -> None:
    """By CKPT.yaml unixtime among the folders matched, skipping incomplete ones; a folder of
    checkpoints counts as its CKPT+ folders."""
    save = tmp_path / "save"
    ckpter = AtomicCheckpointer(save, recoverables={"model": torch.nn.Linear(2, 1)})
    first, second, third = (ckpter.save_checkpoint(meta={"n": n}).path for n in range(3))
    (third / "model.ckpt").unlink()  # incomplete (e.g. damaged by hand)
    broken = save / "CKPT+9999-12-31+23-59-59+00"
    broken.mkdir()
    (broken / "CKPT.yaml").write_text("unixtime: [")
    pattern = str(save / "CKPT+*")
    assert newest_checkpoint([pattern], ckpter) == second
    assert newest_checkpoint([str(save)], ckpter) == second
    assert newest_checkpoint([str(first), str(third)], ckpter) == first  # shell-expanded glob
    # Newest by unixtime, as SpeechBrain ranks recency, not by name.
    meta = yaml.safe_load((first / "CKPT.yaml").read_text())
    (first / "CKPT.yaml").write_text(yaml.dump({**meta, "unixtime": meta["unixtime"] + 60}))
    assert newest_checkpoint([pattern], ckpter) == first
    with pytest.raises(FileNotFoundError, match=re.escape(f"--resume {tmp_path}/x*: no complete "
                                                    "checkpoint (it matched nothing)")):
        newest_checkpoint([f"{tmp_path}/x*"], ckpter)
    missing = "it matched 1, none complete: .*model.ckpt is missing"
    with pytest.raises(FileNotFoundError, match=missing):
        newest_checkpoint([str(third)], ckpter)


def test_resume_from_is_pending_until_the_run_saved(tmp_path: Path) -> None:
    """A run stopped after starting from ``resume_from`` but before its first checkpoint
    starts from it again; once it saved one, it continues from its own."""
    source = AtomicCheckpointer(tmp_path / "a", recoverables={"model": torch.nn.Linear(2, 1)})
    named = source.save_checkpoint().path
    run = AtomicCheckpointer(tmp_path / "b", recoverables={"model": torch.nn.Linear(2, 1)})
    assert pending_resume(None, run) is None
    assert pending_resume(str(named), run) == named  # not started from yet
    (tmp_path / "b" / RESUME_MARKER).write_text(f"{named.resolve()}\n")
    assert pending_resume(str(named), run) == named  # started, but nothing saved since
    run.save_checkpoint()
    assert pending_resume(str(named), run) is None


def test_rerun_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``python`` when that is this interpreter on PATH, its full path otherwise; the
    launcher's command under ddp_run; torchrun's options are not seen by its workers."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    python = bindir / "python"
    python.write_text("")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", str(bindir))
    assert python_command() == "python"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert python_command() == str(python)
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    argv = ["train_CTC.py", "h.yaml", "--select_n_sentences", "[8, 8]"]
    assert rerun_command(argv) == f"{python} train_CTC.py h.yaml --select_n_sentences '[8, 8]'"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert rerun_command(argv) == "torchrun ... train_CTC.py h.yaml --select_n_sentences '[8, 8]'"
    monkeypatch.setenv(LAUNCH_ENV, "python -m mamba_asr.ddp_run --nproc_per_node=2 t.py")
    assert rerun_command(argv) == "python -m mamba_asr.ddp_run --nproc_per_node=2 t.py"


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


# --------------------------------------------------------------------------- early errors


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


EARLY_ERRORS = {  # case -> (recipe, extra arguments, error type, message pattern)
    "missing data folder": (train_CTC, ["--data_folder", "{tmp}/nothere"], LibriSpeechPrepError,
                            "data folder .*nothere does not exist"),
    "cuda without CUDA": (train_CTC, ["--device", "cuda"], ConfigError, "asks for CUDA"),
    "fp16 without CUDA": (train_CTC, ["--precision", "fp16"], PrecisionError, "needs a CUDA"),
    "unknown override": (train_CTC, ["--batch_sise", "8"], ConfigError, "no key 'batch_sise'"),
    "option twice": (train_CTC, ["--seed", "1", "--seed", "2"], ConfigError, "given twice"),
    "resume_from without value": (train_CTC, ["--resume_from"], ConfigError, "start afresh"),
    "resume_from not a checkpoint": (train_CTC, ["--resume_from", "{tmp}"], ConfigError,
                                     "resume_from: .* is not a SpeechBrain checkpoint folder"),
    "resume matching nothing": (train_CTC, ["--resume", "{tmp}/CKPT+*"], ConfigError,
                                "no complete checkpoint"),
    "missing LM": (train_S2S, ["--pretrained_lm_path", "{tmp}/nolm"], ConfigError,
                   "lm file .*nolm/lm.ckpt not found"),
    "LM: resume matching nothing": (train_LM, ["--resume", "{tmp}/CKPT+*"], ConfigError,
                                    "no complete checkpoint"),
}
FAMILY = {train_CTC: "CTC", train_S2S: "S2S", train_LM: "LM"}


@pytest.mark.parametrize("case", sorted(EARLY_ERRORS))
def test_early_errors_leave_nothing_behind(
    case: str, demo_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error found before the run starts leaves no folder it created: not the output
    folder, nor its parent made for it."""
    recipe, extra, error, message = EARLY_ERRORS[case]
    _no_cuda(monkeypatch)
    extra = [a.format(tmp=tmp_path) for a in extra]
    data_folder = [] if "--data_folder" in extra else ["--data_folder", str(demo_corpus)]
    argv = [
        str(REPO / "hparams" / FAMILY[recipe] / "demo.yaml"), *data_folder,
        "--output_folder", str(tmp_path / "new" / "run"), *extra,
    ]
    with pytest.raises(error, match=message):
        recipe.main(argv)
    assert not (tmp_path / "new").exists()


def test_early_error_keeps_an_existing_run(demo_corpus: Path, tmp_path: Path) -> None:
    """A rerun with a mistake removes nothing that was there before."""
    out = tmp_path / "run"
    (out / "save").mkdir(parents=True)
    (out / "train_log.txt").write_text("epoch: 1\n")
    argv = [str(DEMO), "--data_folder", str(demo_corpus), "--output_folder", str(out)]
    with pytest.raises(ConfigError):
        train_CTC.main([*argv, "--batch_sise", "8"])
    assert sorted(p.name for p in out.iterdir()) == ["save", "train_log.txt"]


def test_prep_error_removes_the_new_experiment_folder(tmp_path: Path) -> None:
    """A data folder without the splits fails in the manifest preparation, after the
    experiment folder was written: one error line, exit status 2, no folder left."""
    empty = tmp_path / "LibriSpeech"
    empty.mkdir()
    out = tmp_path / "new" / "run"
    proc = _run([sys.executable, "train_CTC.py", *_ctc_argv(empty, out)])
    missing = empty / "train-clean-100"
    assert _error_line(proc).startswith(f"error: split folder {missing} does not exist")
    assert "Experiment folder" in proc.stdout + proc.stderr  # it was made, then removed
    assert not (tmp_path / "new").exists()


def test_option_given_twice_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = _ctc_argv(tmp_path, out, "--batch_size", "8", "--batch_size", "4")
    proc = _run([sys.executable, "train_CTC.py", *argv])
    assert _error_line(proc) == (
        "error: --batch_size is given twice on the command line (8, then 4): give it once"
    )
    assert not out.exists()


# --------------------------------------------------------------------------- ddp_run, --resume


def _demo_hparams(out: Path, demo_corpus: Path) -> dict[str, Any]:
    """The CTC demo configuration of the run in ``out`` (its prepared manifests)."""
    with open(DEMO, encoding="utf-8") as f:
        return load_hyperpyyaml(f, {"data_folder": str(demo_corpus), "output_folder": str(out)})


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
    assert_two_process_epoch(ddp_run, _demo_hparams(ddp_run, demo_corpus))
    tests = read_test_lines(ddp_run / "train_log.txt")
    assert list(tests["test set"]) == ["test-clean", "test-other"]
    assert (tests["test utterances"] == N_TEST).all()


@pytest.mark.slow
def test_resume_takes_the_newest_complete_checkpoint(
    ddp_run: Path, demo_corpus: Path, tmp_path: Path
) -> None:
    """``--resume <paths the shell expanded>`` into a new output folder: a newer but
    incomplete checkpoint is skipped, the run continues from the DDP run's checkpoint."""
    save = tmp_path / "save"
    shutil.copytree(ddp_run / "save", save)
    (real,) = save.glob("CKPT+*")
    newer = save / "CKPT+9999-12-31+23-59-59+00"
    shutil.copytree(real, newer)
    meta = yaml.safe_load((real / "CKPT.yaml").read_text())
    (newer / "CKPT.yaml").write_text(yaml.dump({**meta, "unixtime": meta["unixtime"] + 60}))
    (newer / "model.ckpt").write_bytes((newer / "model.ckpt").read_bytes()[:100])  # truncated
    out = tmp_path / "new"
    matched = sorted(str(p) for p in save.glob("CKPT+*"))
    argv = _ctc_argv(demo_corpus, out, "--number_of_epochs", "2", "--resume", *matched,
                     select="[16, 4, 4, 4]")
    proc = _run([sys.executable, "train_CTC.py", *argv])
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert f"--resume: the newest complete checkpoint matched is {real}" in output
    assert f"resuming from {real} (resume_from)" in output
    saved = YAML().load(out / "hyperparams.yaml")  # (HyperPyYAML tags: not for yaml.safe_load)
    assert saved["resume_from"] == str(real)
    log = read_train_log(out / "train_log.txt")
    assert list(log.index) == [2]  # epoch 1 came from the checkpoint
    before = read_train_log(ddp_run / "train_log.txt").loc[1, "steps"]
    # the step count went on
    assert log.loc[2, "steps"] == before + train_batches(_demo_hparams(out, demo_corpus))


# --------------------------------------------------------------------------- Ctrl-C


def _interrupt(
    cmd: list[str], ready: Callable[[], bool], **env: str
) -> subprocess.CompletedProcess:
    """Starts ``cmd`` in its own process group, waits until ``ready()``, then sends SIGINT to
    the group, as Ctrl-C in a terminal does; returns the finished process."""
    child = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env}, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not ready():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never got ready"
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGINT)
    stdout, stderr = child.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)


def _newest_complete(save: Path) -> Path:
    ckpts = [(yaml.safe_load((d / "CKPT.yaml").read_text())["unixtime"], d)
             for d in save.glob("CKPT+*")]
    return max(ckpts)[1]


def _assert_interrupted(proc: subprocess.CompletedProcess, expected: str) -> None:
    """Exit status 130, exactly one ``interrupted`` line on stderr and no traceback."""
    assert proc.returncode == 130, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("interrupted")]
    assert lines == [expected], proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "KeyboardInterrupt" not in output


def _command(argv: list[str]) -> str:
    return f"{python_command()} {shlex.join(argv)}"


FINALISER_CTRL_C = """
import os, signal
import speechbrain as sb
from mamba_asr import command_line
from mamba_asr.brain import TrainingBrain

boundaries = []

class Finalised:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs in here, inside the finaliser
            pass

def main(argv):
    Finalised()  # its KeyboardInterrupt is ignored: the run goes on
    boundaries.append("after the finaliser")
    TrainingBrain.on_stage_start(None, sb.Stage.VALID, 1)  # raises before touching self
    boundaries.append("after the next stage start")

try:
    command_line.run_main(main)
except SystemExit as exc:
    after_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    try:
        TrainingBrain.on_fit_batch_end(None, None, None, None, True)
        raised_again = False
    except KeyboardInterrupt:
        raised_again = True
    print(repr((exc.code, boundaries, after_ignored, raised_again)))
"""


def test_a_ctrl_c_swallowed_by_a_finaliser_stops_the_run_at_the_next_boundary() -> None:
    """Ctrl-C while a finaliser runs (a DataLoader iterator's __del__ joining its workers at a
    stage change): Python ignores its KeyboardInterrupt, so the training loop's next batch or
    stage boundary raises it again; run_main exits 130 without reporting the ignored one, and
    ignores a second Ctrl-C. In a fresh interpreter: signal delivery depends on the process's
    threads and handlers, which earlier tests in a pytest worker change."""
    proc = subprocess.run([sys.executable, "-c", FINALISER_CTRL_C], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.strip().splitlines()[-1] == repr(
        (130, ["after the finaliser"], True, True)), proc.stderr[-2000:]
    assert "KeyboardInterrupt" not in proc.stderr


@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_to_resume_from(demo_corpus: Path, tmp_path: Path) -> None:
    """After an intra-epoch checkpoint, and before any: one line with the same command."""
    out = tmp_path / "run"
    argv = ["train_CTC.py", *_ctc_argv(demo_corpus, out, "--ckpt_interval_steps", "1")]
    proc = _interrupt([sys.executable, *argv], lambda: any((out / "save").glob("CKPT+*")))
    latest = _newest_complete(out / "save")
    _assert_interrupted(
        proc,
        f"interrupted: rerun the same command to resume from {latest} (the latest complete "
        f"checkpoint): {_command(argv)}",
    )

    # As the epoch starts: without loader worker processes, as a signal that arrives while
    # the process forks one is lost to CPython's fork hooks (the run goes on).
    out = tmp_path / "early"
    argv = ["train_CTC.py", *_ctc_argv(demo_corpus, out, "--num_workers", "0")]
    log = out / "log.txt"
    proc = _interrupt(
        [sys.executable, *argv], lambda: log.is_file() and "Going into epoch" in log.read_text()
    )
    assert not list((out / "save").glob("CKPT+*"))
    _assert_interrupted(
        proc,
        "interrupted before the first checkpoint was saved: rerun the same command to start "
        f"the run again: {_command(argv)}",
    )


@pytest.mark.slow
def test_ctrl_c_under_ddp_run_prints_once(demo_corpus: Path, tmp_path: Path) -> None:
    """Every process gets the signal; the main one prints the launcher's command."""
    out = tmp_path / "run"
    launcher = ["-m", "mamba_asr.ddp_run", "--nproc_per_node=2"]
    argv = [*launcher, "train_CTC.py", *_ctc_argv(demo_corpus, out, "--ckpt_interval_steps", "1")]
    proc = _interrupt(
        [sys.executable, *argv], lambda: any((out / "save").glob("CKPT+*")), OMP_NUM_THREADS="1"
    )
    latest = _newest_complete(out / "save")
    _assert_interrupted(
        proc,
        f"interrupted: rerun the same command to resume from {latest} (the latest complete "
        f"checkpoint): {_command(argv)}",
    )
    assert "closing signal" not in proc.stderr  # the launcher adds nothing
