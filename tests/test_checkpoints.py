"""AtomicCheckpointer: round trips, SIGKILL during saves, fallback past incomplete checkpoints."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from speechbrain.utils import distributed as sb_dist
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.epoch_loop import EpochCounter

from mamba_asr.checkpoints import KILL_ENV, AtomicCheckpointer

SIZE = 128

# The child saves state k (see ``set_state``) with save_and_keep_only(num_to_keep=2) for
# k = 1..n and prints k once that save returned.
CHILD = f"""
import sys
import torch
from speechbrain.utils.epoch_loop import EpochCounter
from mamba_asr.checkpoints import AtomicCheckpointer

model = torch.nn.Linear({SIZE}, {SIZE})
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
counter = EpochCounter(limit=10**9)
ckpt = AtomicCheckpointer(sys.argv[1], {{"model": model, "optimizer": opt, "counter": counter}})
for k in range(1, int(sys.argv[2]) + 1):
    with torch.no_grad():
        model.weight.copy_(torch.arange({SIZE * SIZE}.0).reshape({SIZE}, {SIZE}) / 1000 + k)
        model.bias.fill_(-k)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.full_like(p, 0.5 * k)
    counter.current = k
    ckpt.save_and_keep_only(meta={{"k": k}}, num_to_keep=2)
    print(k, flush=True)
"""


def make_recoverables() -> dict:
    model = torch.nn.Linear(SIZE, SIZE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"model": model, "optimizer": opt, "counter": EpochCounter(limit=10**9)}


def set_state(recs: dict, k: int) -> None:
    """The same state k as the child's."""
    model, opt = recs["model"], recs["optimizer"]
    with torch.no_grad():
        model.weight.copy_(torch.arange(SIZE * SIZE, dtype=torch.float32).reshape(SIZE, SIZE))
        model.weight.div_(1000).add_(k)
        model.bias.fill_(-k)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.full_like(p, 0.5 * k)
    recs["counter"].current = k


def assert_state(recs: dict, k: int) -> None:
    expected = make_recoverables()
    set_state(expected, k)
    assert recs["counter"].current == k
    assert torch.equal(recs["model"].weight, expected["model"].weight)
    assert torch.equal(recs["model"].bias, torch.full((SIZE,), float(-k)))
    for p in recs["model"].parameters():
        assert torch.equal(recs["optimizer"].state[p]["momentum_buffer"], torch.full_like(p, k / 2))


def ckpt_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("CKPT+"))


def hidden_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


def start_child(tmp_path: Path, n_saves: int, env: dict | None = None) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "save"), str(n_saves)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=REPO,
    )


def test_round_trip(tmp_path: Path) -> None:
    recs = make_recoverables()
    set_state(recs, 3)
    ckpter = AtomicCheckpointer(tmp_path, recs)
    ckpt = ckpter.save_checkpoint(meta={"WER": 12.5}, end_of_epoch=False)
    assert ckpt.meta["WER"] == 12.5 and ckpt.meta["end-of-epoch"] is False
    assert ckpt_dirs(tmp_path) == [ckpt.path] and hidden_dirs(tmp_path) == []
    names = {"model.ckpt", "optimizer.ckpt", "counter.ckpt", "CKPT.yaml"}
    assert {p.name for p in ckpt.path.iterdir()} == names
    assert ckpt.paramfiles == {n: ckpt.path / f"{n}.ckpt" for n in recs}
    assert ckpter.list_checkpoints() == [ckpt]

    fresh = make_recoverables()
    loaded = AtomicCheckpointer(tmp_path, fresh).recover_if_possible()
    assert loaded.path == ckpt.path and loaded.meta == ckpt.meta
    fresh["counter"].current += 1  # not end of epoch: EpochCounter re-runs epoch 3
    assert_state(fresh, 3)

    # plain SpeechBrain reads the same format
    plain = make_recoverables()
    assert Checkpointer(tmp_path, plain).recover_if_possible().path == ckpt.path
    assert torch.equal(plain["model"].weight, recs["model"].weight)


def test_same_custom_name_replaces_checkpoint(tmp_path: Path) -> None:
    recs = make_recoverables()
    ckpter = AtomicCheckpointer(tmp_path, recs)
    for k in (1, 2):
        set_state(recs, k)
        ckpter.save_checkpoint(name="latest")
    assert ckpt_dirs(tmp_path) == [tmp_path / "CKPT+latest"] and hidden_dirs(tmp_path) == []
    fresh = make_recoverables()
    AtomicCheckpointer(tmp_path, fresh).recover_if_possible()
    assert_state(fresh, 2)


def test_killed_by_hook_in_second_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # files per save: model, optimizer, counter, CKPT.yaml; "2:2" = after optimizer.ckpt of save 2
    child = start_child(tmp_path, 3, env={KILL_ENV: "2:2"})
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    assert out.split() == ["1"]
    folder = tmp_path / "save"
    (tmp,) = hidden_dirs(folder)  # the killed save's temporary, never published
    assert ".tmp-" in tmp.name and sorted(p.name for p in tmp.iterdir()) == [
        "model.ckpt",
        "optimizer.ckpt",
    ]
    (only,) = ckpt_dirs(folder)
    recs = make_recoverables()
    ckpter = AtomicCheckpointer(folder, recs)
    assert ckpter.check_checkpoint_dir(only) is None
    with caplog.at_level(logging.WARNING, logger="mamba_asr.checkpoints"):
        loaded = ckpter.recover_if_possible()
    assert loaded.path == only and loaded.meta["k"] == 1
    assert_state(recs, 1)
    assert hidden_dirs(folder) == []
    assert any("removed" in r.message and tmp.name in r.message for r in caplog.records)


def test_killed_at_random_time(tmp_path: Path) -> None:
    seed = random.randrange(10**6)
    child = start_child(tmp_path, 10**6)
    assert child.stdout.readline().strip() == "1", child.stderr.read()  # first save is done
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    os.kill(child.pid, signal.SIGKILL)
    out, _ = child.communicate(timeout=60)
    last = int(out.split()[-1]) if out.split() else 1
    folder = tmp_path / "save"
    recs = make_recoverables()
    ckpter = AtomicCheckpointer(folder, recs)
    assert all(ckpter.check_checkpoint_dir(p) is None for p in ckpt_dirs(folder)), seed
    loaded = ckpter.recover_if_possible()
    k = recs["counter"].current
    # the newest published save is the last reported one, or the next one if killed in between
    assert loaded.meta["k"] == k and last <= k <= last + 1, (seed, last, k)
    assert_state(recs, k)
    assert hidden_dirs(folder) == [] and 1 <= len(ckpt_dirs(folder)) <= 3, seed


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty-meta", "bad-counter"])
def test_fallback_past_plain_speechbrain_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    recs = make_recoverables()
    plain = Checkpointer(tmp_path, recs)
    for k in (1, 2):
        set_state(recs, k)
        newest = plain.save_checkpoint(meta={"k": k})
    target = {"empty-meta": "CKPT.yaml", "bad-counter": "counter.ckpt"}.get(damage, "model.ckpt")
    path = newest.path / target
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("" if damage == "empty-meta" else "12 garbage")
    with pytest.raises((KeyError, OSError, RuntimeError, TypeError, ValueError)):  # plain SB
        Checkpointer(tmp_path, make_recoverables()).recover_if_possible()

    fresh = make_recoverables()
    with caplog.at_level(logging.WARNING, logger="mamba_asr.checkpoints"):
        loaded = AtomicCheckpointer(tmp_path, fresh).recover_if_possible()
    assert loaded.meta["k"] == 1
    assert_state(fresh, 1)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any(newest.path.name in m for m in warnings), warnings
    if damage != "bad-counter":  # found before loading: the warning names the file
        assert any(newest.path.name in m and target in m for m in warnings), warnings
        assert AtomicCheckpointer(tmp_path, fresh).check_checkpoint_dir(newest.path)
    assert newest.path.is_dir()  # left in place


def test_load_errors_everywhere_raise(tmp_path: Path) -> None:
    AtomicCheckpointer(tmp_path, make_recoverables()).save_checkpoint()
    other = {"model": torch.nn.Linear(SIZE, 3)}  # a different model: never start from scratch
    with pytest.raises(RuntimeError, match="could be loaded"):
        AtomicCheckpointer(tmp_path, other).recover_if_possible()


def test_keep_only_with_importance_keys(tmp_path: Path) -> None:
    recs = make_recoverables()
    ckpter = AtomicCheckpointer(tmp_path, recs)
    wers = [30.0, 10.0, 20.0, 40.0, 25.0]
    for k, wer in enumerate(wers, start=1):
        set_state(recs, k)
        ckpter.save_and_keep_only(meta={"WER": wer, "k": k}, num_to_keep=1, min_keys=["WER"])
    kept = sorted(c.meta["WER"] for c in ckpter.list_checkpoints())
    assert kept == [10.0, 25.0]  # lowest WER + most recent
    assert len(ckpt_dirs(tmp_path)) == 2 and hidden_dirs(tmp_path) == []

    fresh = make_recoverables()
    assert AtomicCheckpointer(tmp_path, fresh).recover_if_possible(min_key="WER").meta["k"] == 2
    assert_state(fresh, 2)

    set_state(recs, 6)
    ckpter.save_and_keep_only(
        meta={"WER": 15.0, "k": 6}, num_to_keep=1, max_keys=["WER"], keep_recent=False
    )
    assert [c.meta["WER"] for c in ckpter.list_checkpoints()] == [25.0]  # highest only

    for k in (7, 8, 9):
        ckpter.save_and_keep_only(meta={"k": k}, num_to_keep=2)
    assert sorted(c.meta["k"] for c in ckpter.list_checkpoints()) == [8, 9]
    ckpter.save_and_keep_only(
        meta={"k": 10}, num_to_keep=1, importance_keys=[lambda c: -c.meta["k"]], keep_recent=False
    )
    assert [c.meta["k"] for c in ckpter.list_checkpoints()] == [8]


def test_stale_temporaries_cleaned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recs = make_recoverables()
    ckpter = AtomicCheckpointer(tmp_path, recs)
    set_state(recs, 4)
    ckpt = ckpter.save_checkpoint(name="x")
    host, pid = socket.gethostname(), os.getpid()  # own PID: no save of ours is running
    moved = tmp_path / f".CKPT+x.old-{host}-{pid}-aa11"  # killed between the two renames
    os.rename(ckpt.path, moved)
    (tmp_path / f".CKPT+y.tmp-{host}-{pid}-bb22").mkdir()
    (tmp_path / f".CKPT+z.del-{host}-{pid}-cc33").mkdir()
    live = tmp_path / ".CKPT+w.tmp-elsewhere-1-dd44"  # another host's fresh save: keep
    live.mkdir()
    fresh = make_recoverables()
    with caplog.at_level(logging.WARNING, logger="mamba_asr.checkpoints"):
        assert AtomicCheckpointer(tmp_path, fresh).recover_if_possible().path == ckpt.path
    assert_state(fresh, 4)
    assert hidden_dirs(tmp_path) == [live]
    assert sum("restored" in r.message for r in caplog.records) == 1
    assert sum("removed" in r.message for r in caplog.records) == 2


def test_non_main_process_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = make_recoverables()
    rank0_tmp = tmp_path / ".CKPT+a.tmp-h-1-ee55"
    rank0_tmp.mkdir()
    stale = tmp_path / f".CKPT+b.tmp-{socket.gethostname()}-{os.getpid()}-ff66"
    stale.mkdir()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sb_dist, "is_distributed_initialized", lambda: True)
    monkeypatch.setattr(sb_dist, "ddp_barrier", lambda: None)
    sent = (rank0_tmp, tmp_path / "CKPT+a")  # what rank 0 broadcasts
    monkeypatch.setattr(sb_dist, "ddp_broadcast", lambda obj, src=0: sent)
    ckpter = AtomicCheckpointer(tmp_path, recs)
    assert ckpter.save_checkpoint() is None
    assert ckpter.recover_if_possible() is None
    assert list(rank0_tmp.iterdir()) == [] and stale.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([rank0_tmp.name, stale.name])
