"""Audio that fails to decode in the middle of a run (a file cut short after its header):
the utterance is dropped from its batch with its text, warned about once, counted as
``skipped_utterances``; more than ``max_skipped_fraction`` of a stage stops the run in one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import speechbrain as sb
import torch
from conftest import REPO, write_flac
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataset import DynamicItemDataset

from mamba_asr import data
from mamba_asr.brain import RecipeBrain
from mamba_asr.reports.curves import read_test_lines, read_train_log
from mamba_asr.unreadable_audio import (
    SkippedUtterance,
    SkippedUtterances,
    UnreadableAudio,
    UnreadableAudioError,
    UnreadableBatch,
    collate_readable,
)

TINY = REPO / "tests" / "data" / "tiny"
CTC_DEMO = REPO / "hparams" / "CTC" / "demo.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cut_in_half(path: Path) -> None:
    """Keep the first half of the file's bytes: the header is intact, the audio is not."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.fixture
def audio_files(tmp_path: Path) -> dict[str, Path]:
    """An intact FLAC, a FLAC and a WAV cut in half after their headers."""
    files = {"ok": tmp_path / "ok.flac", "flac": tmp_path / "cut.flac"}
    for path in files.values():
        write_flac(path, 16000)
    files["wav"] = tmp_path / "cut.wav"
    sf.write(files["wav"], np.zeros(16000), 16000, subtype="PCM_16")
    cut_in_half(files["flac"])
    cut_in_half(files["wav"])
    return files


def _dataset(files: dict[str, Path]) -> DynamicItemDataset:
    """The files as a dataset (IDs: their keys) with the audio pipeline of the recipes and a
    token item to drop with it."""
    dataset = DynamicItemDataset(
        {uid: {"wav": str(path), "wrd": uid.upper()} for uid, path in files.items()})
    data.add_audio_pipelines({"sample_rate": 16000, "speed_perturb": None}, None, [dataset])

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens")
    def tokens(wrd: str) -> torch.Tensor:
        return torch.tensor([ord(c) for c in wrd])

    sb.dataio.dataset.add_dynamic_item([dataset], tokens)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig", "wrd", "tokens"])
    return dataset


def test_a_file_cut_after_its_header_is_marked_not_raised(audio_files) -> None:
    """The FLAC fails to decode (libsndfile loses sync); the WAV decodes silently short of its
    header's length: both are marked with the file and the reason, the intact file is read."""
    dataset = _dataset(audio_files)
    items = {dataset[i]["id"]: dataset[i]["sig"] for i in range(len(dataset))}
    assert items["ok"].shape == (16000,)
    for uid in ("flac", "wav"):
        assert isinstance(items[uid], UnreadableAudio), uid
        assert items[uid].file == str(audio_files[uid])
    assert "decoding failed" in items["flac"].reason
    assert "header" in items["wav"].reason


def test_collate_drops_the_unreadable_utterances_with_their_text(audio_files) -> None:
    """Through a loader worker: the batch holds the readable utterance alone (its audio,
    words and tokens), and names the dropped ones; a batch with none readable is empty."""
    dataset = _dataset(audio_files)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, collate_fn=collate_readable, num_workers=1)
    (batch,) = list(loader)
    assert isinstance(batch, PaddedBatch)
    assert batch.id == ["ok"] and batch.wrd == ["OK"]
    assert batch.sig.data.shape == (1, 16000)
    assert batch.tokens.data.tolist() == [[ord("O"), ord("K")]]
    assert [(s.id, s.file) for s in batch.skipped] == [
        ("flac", str(audio_files["flac"])), ("wav", str(audio_files["wav"]))]

    empty = collate_readable([dataset[1], dataset[2]])
    assert isinstance(empty, UnreadableBatch) and len(empty) == 0
    assert [s.id for s in empty.skipped] == ["flac", "wav"]


def test_skipped_utterances_warn_once_and_stop_beyond_the_fraction(caplog) -> None:
    """One warning per file however often it is skipped; 2 of 10 utterances at 0.1 stop
    with one line naming the count, the file and the key; 1 of 10 does not."""
    tally = SkippedUtterances()
    tally.sizes[sb.Stage.TRAIN] = 10
    tally.start(sb.Stage.TRAIN)
    bad = SkippedUtterance("u1", "/corpus/u1.flac", "damaged or truncated")
    with caplog.at_level(logging.WARNING, logger="mamba_asr.unreadable_audio"):
        tally.add(sb.Stage.TRAIN, [bad], 0.1)
        tally.start(sb.Stage.TRAIN)  # the next epoch skips it again
        tally.add(sb.Stage.TRAIN, [bad], 0.1)
        with pytest.raises(UnreadableAudioError) as info:
            tally.add(sb.Stage.TRAIN, [bad._replace(id="u2", file="/corpus/u2.flac")], 0.1)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "/corpus/u1.flac: damaged or truncated" in warnings[0]
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("2 of the 10 utterances of this training stage could not be read")
    assert "max_skipped_fraction 0.1" in message and "/corpus/u1.flac, /corpus/u2.flac" in message
    assert tally.count(sb.Stage.TRAIN) == 2


class _Brain(RecipeBrain):
    def compute_forward(self, batch, stage):
        return self.modules.lin(batch.sig.data)

    def compute_objectives(self, predictions, batch, stage):
        return predictions.sum()


def _brain() -> _Brain:
    return _Brain(
        modules={"lin": torch.nn.Linear(4, 1)}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
        hparams={"max_skipped_fraction": 1.0, "unfreeze_after_epochs": None,
                 "sample_rate": 16000},
        run_opts={"device": "cpu"},
    )


def test_an_unreadable_batch_is_skipped_and_an_error_under_ddp(tmp_path: Path) -> None:
    """A single process skips a batch without readable utterances (no step, NaN loss); under
    DDP (here a process group of one) it is a one-line error naming the file."""
    brain = _brain()
    brain.init_optimizers()
    before = [p.detach().clone() for p in brain.modules.parameters()]
    lost = UnreadableBatch([SkippedUtterance("u1", "/corpus/u1.flac", "truncated")])
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    assert torch.isnan(brain.fit_batch(lost))
    assert brain.optimizer_step == 0 and brain.unreadable.count(sb.Stage.TRAIN) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, brain.modules.parameters(), strict=True))
    ok = collate_readable([{"id": "u2", "sig": torch.ones(4)},
                           {"id": "u3", "sig": UnreadableAudio("/corpus/u3.flac", "bad")}])
    brain.fit_batch(ok)
    assert brain.optimizer_step == 1 and brain.unreadable.count(sb.Stage.TRAIN) == 2

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(UnreadableAudioError, match=r"/corpus/u1\.flac.*DDP"):
            brain.fit_batch(lost)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_training_survives_a_flac_cut_in_half(tmp_path: Path) -> None:
    """train_CTC.py on the tiny corpus with one training FLAC cut in half after preparation:
    one epoch trains on the other utterances (``train skipped_utterances: 1``, one warning in
    the log naming the file), the tests run; with ``max_skipped_fraction`` 0 the run stops with the
    one-line error and exit status 2."""
    corpus = tmp_path / "corpus"
    shutil.copytree(TINY, corpus)
    prepared = tmp_path / "prepared"
    data.prepare_manifests({
        "data_folder": str(corpus), "prep_folder": str(prepared),
        "train_splits": ["train-clean-100"], "dev_splits": ["dev-clean"],
        "test_splits": ["test-clean", "test-other"], "select_n_sentences": None,
        "skip_prep": False,
    })
    cut = sorted((corpus / "LibriSpeech" / "train-clean-100").rglob("*.flac"))[0]
    cut_in_half(cut)
    base = [
        sys.executable, "train_CTC.py", str(CTC_DEMO), "--data_folder", str(corpus),
        "--prep_folder", str(prepared), "--skip_prep", "True", "--number_of_epochs", "1",
        "--noprogressbar",
    ]
    out = tmp_path / "run"
    run = subprocess.run([*base, "--output_folder", str(out), "--max_skipped_fraction", "0.5"],
                         cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    epoch = read_train_log(out / "train_log.txt").loc[1]
    assert epoch["train skipped_utterances"] == 1
    assert "valid skipped_utterances" not in epoch  # the dev files are intact
    assert (read_test_lines(out / "train_log.txt")["test skipped_utterances"] == 0).all()
    warnings = [line for line in run.stdout.splitlines() if "skipping utterance" in line]
    assert len(warnings) == 1 and str(cut) in warnings[0], run.stdout[-3000:]

    stop = subprocess.run([*base, "--output_folder", str(tmp_path / "stop"),
                           "--max_skipped_fraction", "0.0"],
                          cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert stop.returncode == 2, stop.stderr[-3000:]
    assert "Traceback" not in stop.stderr
    assert stop.stderr.strip().splitlines()[-1] == (
        "error: 1 of the 6 utterances of this training stage could not be read, more than "
        f"max_skipped_fraction 0 allows ({cut}); replace or remove the damaged files and "
        "prepare again, or raise max_skipped_fraction above 0.167 to go on without them"
    )
