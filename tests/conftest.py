"""Shared fixtures and helpers: small LibriSpeech-layout trees built by the tests, the demo
corpus, parameter counts, the epochs of a train log, the training batches of a recipe."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import soundfile as sf
from runs import (  # noqa: F401  (session fixtures)
    built_once,
    ctc_export,
    ctc_graph_export,
    ctc_random_run,
    ctc_run,
    s2s_lm_folder,
    s2s_manifests,
    s2s_run,
)
from serving import (  # noqa: F401  (session fixtures)
    clips,
    random_export,
    stream_export,
    stream_export_words,
)

if TYPE_CHECKING:
    from torch import nn

REPO = Path(__file__).resolve().parents[1]
# The shared code that reads the YAML keys of the ASR recipes (besides the scripts).
RECIPE_CODE = [
    REPO / "mamba_asr" / f"{name}.py" for name in ("data", "brain", "config", "finetune")
]
DEMO_DATA = REPO / "data" / "demo"


@pytest.fixture(autouse=True)
def _speechbrain_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without ``SB_LOG_LEVEL``: SpeechBrain's ``setup_logging`` (a recipe
    started in-process) sets it to DEBUG in ``os.environ``, and every subprocess a later test
    starts would inherit it and log SpeechBrain's debug lines to stderr."""
    monkeypatch.delenv("SB_LOG_LEVEL", raising=False)


WORDS = ["HELLO", "WORLD", "MAMBA", "SPEECH", "IT'S", "A", "TEST", "OF", "THE", "SCAN"]


def write_flac(path: Path, n_samples: int, sample_rate: int = 16000, channels: int = 1) -> None:
    """Write low-level noise of ``n_samples`` frames as 16-bit FLAC."""
    rng = np.random.default_rng(n_samples)
    shape = (n_samples,) if channels == 1 else (n_samples, channels)
    data = (rng.standard_normal(shape) * 0.05).clip(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sample_rate, format="FLAC", subtype="PCM_16")


def make_librispeech(
    folder: Path, splits: dict[str, dict[tuple[int, int], int]]
) -> dict[str, dict[str, tuple[int, str]]]:
    """Build ``folder/LibriSpeech/<split>/<spk>/<chapter>/…`` with noise audio.

    ``splits`` maps split -> {(speaker, chapter): number of utterances}. Returns
    split -> {utterance ID: (number of samples, transcript)}.
    """
    expected: dict[str, dict[str, tuple[int, str]]] = {}
    for split, chapters in splits.items():
        expected[split] = {}
        for (spk, chapter), n_utts in chapters.items():
            chapter_dir = folder / "LibriSpeech" / split / str(spk) / str(chapter)
            lines = []
            for utt in range(n_utts):
                utt_id = f"{spk}-{chapter}-{utt:04d}"
                n_samples = 4000 + 797 * ((spk + chapter + utt) % 11)
                text = " ".join(WORDS[(utt + k) % len(WORDS)] for k in range(2 + utt % 4))
                write_flac(chapter_dir / f"{utt_id}.flac", n_samples)
                lines.append(f"{utt_id} {text}\n")
                expected[split][utt_id] = (n_samples, text)
            (chapter_dir / f"{spk}-{chapter}.trans.txt").write_text("".join(lines))
    return expected


SMALL_TREE = {
    "train-clean-100": {(19, 198): 4, (26, 495): 3},
    "dev-clean": {(84, 121123): 3},
    "test-clean": {(61, 70968): 2, (121, 121726): 2},
}


@pytest.fixture
def small_tree(tmp_path: Path) -> tuple[Path, dict[str, dict[str, tuple[int, str]]]]:
    """A three-split LibriSpeech tree under tmp_path/corpus and its expected contents."""
    root = tmp_path / "corpus"
    return root, make_librispeech(root, SMALL_TREE)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo corpus (synthesised on first use; idempotent afterwards)."""

    def build(_: Path) -> Path:
        subprocess.run([sys.executable, "-m", "mamba_asr.demo_corpus", "--out", str(DEMO_DATA)],
                       check=True, cwd=REPO)
        return DEMO_DATA

    return built_once(tmp_path_factory, "demo_corpus", build)


def n_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def logged_epochs(train_log: Path) -> list[int]:
    """The epoch of every ``epoch: N, ...`` line of a recipe's train_log.txt, in order and with
    repeats (an epoch trained again after a resume is logged again)."""
    return [int(m) for m in re.findall(r"^epoch: (\d+),", train_log.read_text(), flags=re.M)]


def train_batches(hparams: dict[str, Any]) -> int:
    """Batches per epoch of a recipe's training set (``train_csv``): the length of its
    ``DynamicBatchSampler``, which depends on how many utterances fall in each duration bucket,
    not on the epoch's shuffle."""
    from mamba_asr import data  # SpeechBrain: imported only by the recipe tests

    sampler = data.dynamic_batch_sampler(
        data.training_set(hparams), hparams["dynamic_batch_sampler_train"]
    )
    return len(sampler)


def assert_two_process_epoch(out: Path, hparams: dict[str, Any]) -> None:
    """One epoch trained by 2 processes into ``out``: each trained half of the training batches
    of ``hparams`` (the run's configuration), gradients averaged (one optimizer step per pair),
    and the main process alone saved (one checkpoint)."""
    from mamba_asr.reports.curves import read_train_log

    half = math.ceil(train_batches(hparams) / 2)
    log = read_train_log(out / "train_log.txt")
    assert list(log.index) == [1]
    assert log.loc[1, "process_batches"] == f"{half} {half}"  # both ranks trained a half
    assert log.loc[1, "steps"] == half
    assert len(list((out / "save").glob("CKPT+*"))) == 1
