"""Training statistics (gradient norm, clipped steps, throughput, memory, ETA) in the train
log, log.txt and TensorBoard across resumes, and the divergence stop: an in-process toy Brain
(a linear model on a fixed data set) trained by SpeechBrain's loop; ``mamba_asr.training_monitor``
functions on values."""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import speechbrain as sb
import torch
from speechbrain.utils.epoch_loop import EpochCounter
from speechbrain.utils.train_logger import FileTrainLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mamba_asr.brain import RecipeBrain, TrainingBrain
from mamba_asr.checkpoints import AtomicCheckpointer
from mamba_asr.command_line import ConfigError
from mamba_asr.config import cli
from mamba_asr.reports.curves import parse_log_line, read_train_log
from mamba_asr.training_monitor import (
    MonitorSettings,
    TrainingDiverged,
    format_eta,
    parse_eta,
    rising_evaluations,
)

BATCHES, BATCH_SIZE, SLEEP = 8, 4, 0.01  # per epoch; seconds per training batch
MAX_NORM = 0.5  # most steps of the toy exceed it: clipped


class _Toy(TrainingBrain):
    """y = 3x on 32 points; ``valid_losses[epoch]`` replaces the valid loss when given."""

    throughput_unit = "items"
    valid_losses: dict[int, float] = {}
    crash_at: int | None = None  # the training batch (counted over the fit) that raises
    batches = 0

    def trained_amount(self, batch):
        return float(batch[0].shape[0])

    def compute_forward(self, batch, stage):
        if stage == sb.Stage.TRAIN:
            time.sleep(SLEEP)
            self.batches += 1
            if self.batches == self.crash_at:
                raise RuntimeError("crash")
        return self.modules.lin(batch[0].to(self.device))

    def compute_objectives(self, predictions, batch, stage):
        loss = ((predictions - batch[1]) ** 2).mean()
        epoch = self.hparams.epoch_counter.current
        if stage == sb.Stage.VALID and epoch in self.valid_losses:
            return torch.tensor(self.valid_losses[epoch])
        return loss

    def checkpoints_to_keep(self) -> int:
        return 10


def _data() -> torch.utils.data.TensorDataset:
    x = torch.linspace(-1, 1, BATCHES * BATCH_SIZE).unsqueeze(1)
    return torch.utils.data.TensorDataset(x, 3 * x)


def _fit(out: Path, epochs: int, resume_from: str | None = None, patience: int | None = None,
         valid_losses: dict[int, float] | None = None, crash_at: int | None = None,
         ckpt_interval_steps: int = 0) -> _Toy:
    """A fresh toy Brain on ``out`` (resuming from its latest checkpoint, or ``resume_from``)
    trained to ``epochs``; its monitor logs every 2 optimizer steps and to TensorBoard."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(1, 1)
    counter = EpochCounter(epochs)
    hparams = {
        "output_folder": str(out), "resume_from": resume_from, "max_consecutive_nonfinite": 3,
        "epoch_counter": counter, "train_logger": FileTrainLogger(out / "train_log.txt"),
        "log_interval_steps": 2, "tensorboard": True, "divergence_patience": patience,
    }
    ckpt = AtomicCheckpointer(out / "save", recoverables={"model": lin, "counter": counter})
    brain = _Toy({"lin": lin}, lambda p: torch.optim.SGD(p, lr=0.05), hparams,
                 {"device": "cpu", "max_grad_norm": MAX_NORM, "noprogressbar": True,
                  "ckpt_interval_steps": ckpt_interval_steps}, ckpt)
    brain.valid_losses = valid_losses or {}
    brain.crash_at = crash_at
    brain.fit(counter, _data(), _data(), train_loader_kwargs={"batch_size": BATCH_SIZE},
              valid_loader_kwargs={"batch_size": BATCH_SIZE})
    return brain


def _record_norms(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The list every gradient norm ``clip_grad_norm_`` returns from now on is appended to."""
    norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm):
        norm = clip(params, max_norm)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    return norms


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard's own reader sees the event files."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_rising_evaluations_counts_the_last_rises() -> None:
    assert rising_evaluations([]) == rising_evaluations([5.0]) == 0
    assert rising_evaluations([3.0, 2.0, 2.5, 2.7]) == 2
    assert rising_evaluations([3.0, 2.0, 2.5, 2.4]) == 0
    assert rising_evaluations([3.0, 2.0, 2.0]) == 0  # equal is not a rise
    assert rising_evaluations([3.0, 2.0, float("nan")]) == 1  # non-finite: a rise
    assert rising_evaluations([3.0, float("inf"), float("nan")]) == 2
    assert rising_evaluations([3.0, float("nan"), 9.0]) == 0  # finite after NaN: a fall


def test_eta_text_and_settings_errors() -> None:
    assert format_eta(3725.4) == "1:02:05" and parse_eta("1:02:05") == 3725
    assert format_eta(49 * 3600) == "49:00:00" and format_eta(-3) == "0:00:00"
    for bad in ({"log_interval_steps": -1}, {"log_interval_steps": 2.5},
                {"divergence_patience": 0}, {"tensorboard": "yes"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            MonitorSettings(**bad)


def test_audio_seconds_of_a_batch() -> None:
    wavs = torch.zeros(3, 32000)  # padded to 2 s at 16 kHz
    batch = SimpleNamespace(sig=(wavs, torch.tensor([1.0, 0.5, 0.25])))
    fake = SimpleNamespace(hparams=SimpleNamespace(sample_rate=16000))
    assert RecipeBrain.trained_amount(fake, batch) == pytest.approx(3.5)  # 2 + 1 + 0.5 s
    assert RecipeBrain.trained_amount(fake, SimpleNamespace()) is None


def test_epoch_and_interval_statistics_and_tensorboard_across_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    norms = _record_norms(monkeypatch)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="mamba_asr.training_monitor")
    start = time.perf_counter()
    _fit(out, 2)
    wall = time.perf_counter() - start
    _fit(out, 3)  # the same command with one more epoch: resumes after epoch 2
    log = read_train_log(out / "train_log.txt")
    assert list(log.index) == [1, 2, 3] and list(log["steps"]) == [8, 16, 24]
    assert len(norms) == 3 * BATCHES
    for epoch in (1, 2, 3):
        row, epoch_norms = log.loc[epoch], norms[(epoch - 1) * BATCHES:epoch * BATCHES]
        assert row["grad_norm_max"] >= row["grad_norm_mean"] > 0
        assert row["grad_norm_mean"] == pytest.approx(sum(epoch_norms) / BATCHES, rel=1e-2)
        assert row["grad_norm_max"] == pytest.approx(max(epoch_norms), rel=1e-2)
        assert row["clipped_steps"] == sum(n > MAX_NORM for n in epoch_norms) > 0
        # items per second of training: at most the items over the sleeps alone, at least the
        # items over the whole first fit (two epochs, validation and checkpoints included)
        items = BATCHES * BATCH_SIZE
        assert items / wall < row["items_per_s"] <= items / (BATCHES * SLEEP)
        assert row["items_per_s_total"] == row["items_per_s"]  # one process
        assert row["peak_mem_gb"] > 0
    assert [parse_eta(e) for e in log["eta"]][1:] == [0, 0]  # epochs 2 of 2, 3 of 3

    # log.txt: every 2 optimizer steps, the interval's own norms; continuing after the resume
    lines = [parse_log_line(r.getMessage()) for r in caplog.records
             if r.getMessage().startswith("step: ")]
    assert [line["step"] for line in lines] == list(range(2, 25, 2))
    for line in lines:
        pair = norms[line["step"] - 2:line["step"]]
        assert line["grad_norm_max"] == pytest.approx(max(pair), rel=1e-2)
        assert line["clipped_steps"] == sum(n > MAX_NORM for n in pair)
        assert line["progress"] == f"{(line['step'] - 1) % BATCHES + 1}/{BATCHES}"
        assert line["epoch"] == (line["step"] - 1) // BATCHES + 1
    assert parse_eta(lines[-1]["eta"]) == 0 and "eta" in lines[0]

    # TensorBoard: one value per step and tag, the resumed run's curves continuing
    tb = _scalars(out / "tensorboard")
    assert [s for s, _ in tb["train/grad_norm_max"]] == list(range(2, 25, 2))
    assert tb["epoch/epoch"] == [(8, 1.0), (16, 2.0), (24, 3.0)]
    for tag in ("epoch/train_loss", "epoch/valid_loss", "epoch/lr", "epoch/items_per_s_total",
                "epoch/clipped_steps", "epoch/peak_mem_gb", "epoch/eta_s", "train/loss"):
        steps = [s for s, _ in tb[tag]]
        assert steps == sorted(set(steps)), tag
    # ETA after epoch 1 of 2: the epoch's wall time (the sleeps, at most the whole fit)
    eta = [v for _, v in tb["epoch/eta_s"]]
    assert BATCHES * SLEEP < eta[0] < wall and eta[1:] == [0, 0]
    # steps 2, 4, ...: the batches left, then (after step 8) one more epoch, then only the
    # validation left at step 16 (as long as epoch 1's)
    interval_eta = [v for _, v in tb["train/eta_s"]]
    assert interval_eta[0] > interval_eta[1] > interval_eta[2] > interval_eta[3] > 0
    assert interval_eta[7] < interval_eta[4] and interval_eta[7] < eta[0]
    for epoch, (_, value) in zip((1, 2, 3), tb["epoch/grad_norm_mean"], strict=True):
        assert value == pytest.approx(log.loc[epoch, "grad_norm_mean"], rel=1e-2)
    assert [v for _, v in tb["epoch/valid_loss"]] == pytest.approx(
        list(log["valid loss"]), rel=1e-2)

    # Resuming from epoch 1's checkpoint after steps up to 24 were written: TensorBoard's
    # reader drops those after step 8 (purge_step), the retrained epoch 2 replaces them.
    first = min((out / "save").glob("CKPT+*"))
    _fit(out, 2, resume_from=str(first))
    tb = _scalars(out / "tensorboard")
    assert tb["epoch/epoch"] == [(8, 1.0), (16, 2.0)]
    assert [s for s, _ in tb["train/loss"]] == list(range(2, 17, 2))
    last = read_train_log(out / "train_log.txt").loc[2]  # the last line of epoch 2
    assert tb["epoch/grad_norm_mean"][-1][1] == pytest.approx(last["grad_norm_mean"], rel=1e-2)


def test_resumed_mid_epoch_the_epoch_counts_both_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that crashed in batch 7, after its checkpoint at batch 4, resumes there: the epoch
    line counts batches 1-4 of the crashed run and 5-8 of the resumed one, TensorBoard's
    reader keeps one curve (the crashed run's step 6 dropped)."""
    norms = _record_norms(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        _fit(out, 1, crash_at=7, ckpt_interval_steps=4)
    assert len(norms) == 6
    _fit(out, 1)
    counted = norms[:4] + norms[6:]
    assert len(counted) == BATCHES
    row = read_train_log(out / "train_log.txt").loc[1]
    assert row["steps"] == BATCHES
    assert row["clipped_steps"] == sum(n > MAX_NORM for n in counted)
    assert row["grad_norm_mean"] == pytest.approx(sum(counted) / BATCHES, rel=1e-2)
    assert row["grad_norm_max"] == pytest.approx(max(counted), rel=1e-2)
    tb = _scalars(out / "tensorboard")
    assert [s for s, _ in tb["train/grad_norm_max"]] == [2, 4, 6, 8]
    assert [v for _, v in tb["train/grad_norm_max"]] == pytest.approx(
        [max(norms[i:i + 2]) for i in (0, 2, 6, 8)])  # step 6: the resumed run's


def test_rising_valid_loss_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "run"
    losses = {1: 1.0, 2: 0.5, 3: 0.6, 4: float("nan"), 5: 0.4}

    def main(argv: list[str]) -> None:
        _fit(out, 5, patience=2, valid_losses=losses)

    monkeypatch.setattr("sys.argv", ["train"])
    with pytest.raises(SystemExit) as stop:
        cli(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: training diverged")
    log = read_train_log(out / "train_log.txt")
    assert list(log.index) == [1, 2, 3, 4]  # stopped after the second rise
    metas = {int(re.search(r"epoch: (\d+)", (d / "CKPT.yaml").read_text()).group(1)): d
             for d in (out / "save").glob("CKPT+*")}
    assert sorted(metas) == [1, 2, 3, 4]  # epoch 4's checkpoint saved before stopping
    assert f"--resume_from {metas[2]}" in err  # the last before the rise
    assert "epochs 2-4: 0.5 -> 0.6 -> nan" in err
    for epoch in (2, 3, 4):
        mean, top = log.loc[epoch, "grad_norm_mean"], log.loc[epoch, "grad_norm_max"]
        match = re.search(rf"e{epoch} ([\d.e+-]+)/([\d.e+-]+)", err)
        assert float(match.group(1)) == pytest.approx(mean, rel=1e-2)
        assert float(match.group(2)) == pytest.approx(top, rel=1e-2)


def test_nonfinite_limit_names_the_newest_checkpoint_and_recent_norms(tmp_path: Path) -> None:
    brain = _fit(tmp_path / "run", 1)
    newest = brain.checkpointer.find_checkpoint()
    brain.on_stage_start(sb.Stage.TRAIN, 2)
    brain.fit_batch((torch.tensor([[1.0]]), torch.tensor([[3.0]])))
    with pytest.raises(TrainingDiverged) as stop:
        for _ in range(3):
            brain.fit_batch((torch.tensor([[float("nan")]]), torch.tensor([[3.0]])))
    message = str(stop.value)
    assert "\n" not in message and "3 optimizer steps in a row" in message
    assert f"--resume_from {newest.path}" in message
    recent = message.split("gradient norms of the last steps: ")[1].split(";")[0].split()
    assert recent[-3:] == ["nan"] * 3 and math.isfinite(float(recent[-4]))
