"""Checkpoint integrity and full disks: sha256 of every checkpoint file recorded in CKPT.yaml
and verified on listing (a flipped byte falls back to the previous checkpoint), and a save
that runs out of space ends with one line, the previous checkpoints intact."""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, logged_epochs
from runs import CTC_DEMO, CTC_SELECT, ENV
from speechbrain.utils.checkpoints import Checkpointer
from test_checkpoints import assert_state, ckpt_dirs, hidden_dirs, make_recoverables, set_state

from mamba_asr import checkpoints
from mamba_asr.checkpoints import DIGESTS_KEY, AtomicCheckpointer, CheckpointSpaceError
from mamba_asr.command_line import ConfigError
from mamba_asr.config import cli
from mamba_asr.resume import checkpoint_from_dir, newest_checkpoint

DAMAGED = "does not match the sha256 recorded when it was saved"
NO_SPACE = re.compile(
    r"no space left in (?P<dir>\S+): the checkpoint needs about (?P<need>[\d.]+) MB and "
    r"(?P<free>[\d.]+) MB are free; the previous checkpoints are intact: free space and rerun "
    r"the same command to resume$"
)


def flip_middle_byte(path: Path) -> None:
    """Inverts the byte in the middle of ``path`` (inside the tensor data of a model.ckpt)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def save_states(folder: Path, ks: list[int], **kwargs: object) -> list:
    recs = make_recoverables()
    ckpter = AtomicCheckpointer(folder, recs)
    saved = []
    for k in ks:
        set_state(recs, k)
        saved.append(ckpter.save_checkpoint(meta={"k": k, "WER": 10.0 * k}, **kwargs))
    return saved


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_digests_recorded_and_plain_speechbrain_reads_them(tmp_path: Path) -> None:
    (ckpt,) = save_states(tmp_path, [3])
    meta = yaml.safe_load((ckpt.path / "CKPT.yaml").read_text())
    files = {p.name for p in ckpt.path.iterdir()} - {"CKPT.yaml"}
    assert set(meta[DIGESTS_KEY]) == files == {"model.ckpt", "optimizer.ckpt", "counter.ckpt"}
    for name, digest in meta[DIGESTS_KEY].items():
        assert digest == hashlib.sha256((ckpt.path / name).read_bytes()).hexdigest()
    assert ckpt.meta == meta  # what save_checkpoint returns is what it wrote
    plain = make_recoverables()
    assert Checkpointer(tmp_path, plain).recover_if_possible().path == ckpt.path
    assert_state(plain, 3)


def test_flipped_byte_falls_back_to_the_previous_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    older, newest = save_states(tmp_path, [1, 2])
    flip_middle_byte(newest.path / "model.ckpt")
    plain = make_recoverables()  # without digests the damaged weights load silently
    assert Checkpointer(tmp_path, plain).recover_if_possible().path == newest.path

    fresh = make_recoverables()
    ckpter = AtomicCheckpointer(tmp_path, fresh)
    with caplog.at_level(logging.WARNING, logger="mamba_asr.checkpoints"):
        assert ckpter.recover_if_possible().path == older.path
        assert ckpter.find_checkpoints() == [older]
        assert ckpter.list_checkpoints() == [older]
    assert_state(fresh, 1)
    assert warnings_of(caplog) == [
        f"skipping damaged checkpoint {newest.path}: model.ckpt {DAMAGED}"
    ]
    assert ckpter.check_checkpoint_dir(newest.path) == f"model.ckpt {DAMAGED}"
    assert ckpter.check_checkpoint_dir(older.path) is None

    set_state(fresh, 3)  # keep-only neither keeps nor deletes the damaged one
    ckpter.save_and_keep_only(meta={"k": 3}, num_to_keep=1)
    assert [c.meta["k"] for c in ckpter.list_checkpoints()] == [3]
    assert newest.path.is_dir() and not older.path.exists()


def test_a_named_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    """--resume_from, evaluate.py/export.py --ckpt CKPT+...: one error line; --resume PATTERN
    takes the newest that verifies."""
    older, newest = save_states(tmp_path, [1, 2])
    flip_middle_byte(newest.path / "counter.ckpt")
    ckpter = AtomicCheckpointer(tmp_path, make_recoverables())
    with pytest.raises(ConfigError, match=re.escape(f"{newest.path} is incomplete or damaged: c")):
        checkpoint_from_dir(newest.path, ckpter)
    assert newest_checkpoint([str(tmp_path / "CKPT+*")], ckpter) == older.path


def test_best_checkpoints_skip_a_damaged_one(tmp_path: Path) -> None:
    """What evaluate.py and export.py average: the best by valid WER that verify."""
    saved = save_states(tmp_path, [1, 2, 3, 4])
    flip_middle_byte(saved[0].path / "optimizer.ckpt")  # the best WER
    ckpter = AtomicCheckpointer(tmp_path, make_recoverables())
    best = ckpter.find_checkpoints(min_key="WER", max_num_checkpoints=2)
    assert [c.meta["k"] for c in best] == [2, 3]
    assert ckpter.find_checkpoint(min_key="WER").meta["k"] == 2


def test_verification_hashes_each_file_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real = checkpoints.sha256_file
    monkeypatch.setattr(checkpoints, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    recs = make_recoverables()
    ckpter = AtomicCheckpointer(tmp_path, recs)
    for k in range(1, 6):
        set_state(recs, k)
        ckpter.save_and_keep_only(meta={"k": k}, num_to_keep=3)
    assert len(hashed) == 5 * 3  # at saving only: the digests of the kept ones are cached
    hashed.clear()
    assert len(ckpter.list_checkpoints()) == 3 and hashed == []

    monkeypatch.setattr(checkpoints, "_DIGEST_CACHE", {})  # as in a new process
    newest = AtomicCheckpointer(tmp_path, make_recoverables()).find_checkpoint()
    assert newest.meta["k"] == 5
    assert sorted(p.name for p in hashed) == ["counter.ckpt", "model.ckpt", "optimizer.ckpt"]
    assert {p.parent for p in hashed} == {newest.path}  # the older ones are not read


def test_checkpoints_without_digests_load_as_before(tmp_path: Path) -> None:
    recs = make_recoverables()
    set_state(recs, 2)
    old = Checkpointer(tmp_path, recs).save_checkpoint(meta={"k": 2})  # plain SpeechBrain
    assert DIGESTS_KEY not in old.meta
    fresh = make_recoverables()
    assert AtomicCheckpointer(tmp_path, fresh).recover_if_possible().path == old.path
    assert_state(fresh, 2)


def full_disk_writer(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """torch.save writes half of the optimizer's file, then raises ``error``."""
    real = torch.save

    def save(obj: object, path: str | Path) -> None:
        real(obj, path)
        if Path(path).name == "optimizer.ckpt":
            Path(path).write_bytes(Path(path).read_bytes()[:1000])
            raise error

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_is_one_line_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recs = make_recoverables()
    ckpter = AtomicCheckpointer(tmp_path, recs)
    set_state(recs, 1)
    first = ckpter.save_checkpoint(meta={"k": 1})
    size = sum(p.stat().st_size for p in first.path.iterdir())
    full_disk_writer(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    set_state(recs, 2)
    with pytest.raises(CheckpointSpaceError) as caught:
        ckpter.save_checkpoint(meta={"k": 2})
    match = NO_SPACE.match(str(caught.value))
    assert match, str(caught.value)
    assert match["dir"] == str(tmp_path)
    assert float(match["need"]) == pytest.approx(size / 1e6, abs=0.05)
    assert float(match["free"]) == pytest.approx(shutil.disk_usage(tmp_path).free / 1e6, rel=0.1)
    assert ckpt_dirs(tmp_path) == [first.path] and hidden_dirs(tmp_path) == []
    monkeypatch.undo()
    fresh = make_recoverables()
    assert AtomicCheckpointer(tmp_path, fresh).recover_if_possible().path == first.path
    assert_state(fresh, 1)


def test_torch_write_failure_is_a_space_error_only_without_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_error = RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470"
    )
    full_disk_writer(monkeypatch, torch_error)
    ckpter = AtomicCheckpointer(tmp_path, make_recoverables())
    with pytest.raises(RuntimeError) as caught:  # the disk has room: another failure
        ckpter.save_checkpoint()
    assert caught.value is torch_error
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: usage._replace(free=30_000))
    with pytest.raises(CheckpointSpaceError) as caught:
        ckpter.save_checkpoint()
    match = NO_SPACE.match(str(caught.value))
    assert match, str(caught.value)
    # no checkpoint yet: the tensors' bytes, (128 * 128 + 128) * 4 of the model's (a fresh SGD
    # holds none)
    assert (match["need"], match["free"]) == ("0.1", "0.0")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted on a temporary folder (where this process may mount one)."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        # lazily: the failed torch writer's file may stay open until garbage collection
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_real_full_disk(small_tmpfs: Path) -> None:
    """torch's own error on a full tmpfs ("unexpected pos") becomes the one line."""
    model = torch.nn.Linear(400, 400)  # 0.64 MB of weights, as many of momentum
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    ckpter = AtomicCheckpointer(small_tmpfs, {"model": model, "optimizer": opt})
    first = ckpter.save_checkpoint(meta={"k": 1})
    with pytest.raises(CheckpointSpaceError) as caught:
        ckpter.save_checkpoint(meta={"k": 2})
    match = NO_SPACE.match(str(caught.value))
    assert match and float(match["need"]) == pytest.approx(1.3, abs=0.05), str(caught.value)
    assert float(match["free"]) < 1.3
    assert list(small_tmpfs.iterdir()) == [first.path]
    assert AtomicCheckpointer(small_tmpfs, {"model": model, "optimizer": opt}).find_checkpoint()


def test_full_disk_through_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    saved = save_states(tmp_path, [1])
    full_disk_writer(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    ckpter = AtomicCheckpointer(tmp_path, make_recoverables())
    with pytest.raises(SystemExit) as exited:
        cli(lambda argv: ckpter.save_checkpoint())
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no space left in "), err
    assert NO_SPACE.match(err.strip().removeprefix("error: "))
    assert ckpt_dirs(tmp_path) == [saved[0].path] and hidden_dirs(tmp_path) == []


@pytest.mark.slow
def test_training_resumes_from_the_previous_checkpoint(
    ctc_run: Path, demo_corpus: Path, tmp_path: Path
) -> None:
    """A flipped byte in the newest model.ckpt of a 2-epoch run: the same command with 3 epochs
    (and no test stage, for time) resumes from epoch 1's checkpoint (one warning naming the
    file) and trains epochs 2 and 3."""
    run = tmp_path / "run"
    shutil.copytree(ctc_run, run)
    older, newest = sorted((run / "save").glob("CKPT+*"))
    assert yaml.safe_load((newest / "CKPT.yaml").read_text())["epoch"] == 2
    flip_middle_byte(newest / "model.ckpt")
    cmd = [
        sys.executable, "train_CTC.py", str(CTC_DEMO), "--data_folder", str(demo_corpus),
        "--output_folder", str(run), "--select_n_sentences", CTC_SELECT,
        "--number_of_epochs", "3", "--noprogressbar", "--test_csv", "[]",  # no test stage
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    damaged = [line for line in log.splitlines() if DAMAGED in line]
    assert len(damaged) == 1 and f"{newest}: model.ckpt" in damaged[0], damaged
    assert f"Loading a checkpoint from {older}" in log
    assert logged_epochs(run / "train_log.txt") == [1, 2, 2, 3]
    assert newest.is_dir()  # left for the user to look at
