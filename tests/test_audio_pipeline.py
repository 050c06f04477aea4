"""The recipes' audio pipeline (``data.add_audio_pipelines``): any sample rate or channel count
in, the configuration's rate in mono out, with one warning that counts the files changed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import speechbrain as sb
from speechbrain.dataio.dataset import DynamicItemDataset

from mamba_asr import data
from mamba_asr.audio_info import AudioHeaderError
from mamba_asr.audio_io import AudioError, load_audio
from mamba_asr.unreadable_audio import UnreadableAudio

RATE = 16000
FREQ = 440.0  # Hz
SECONDS = 0.5


def sine(rate: int, amplitude: float = 0.5) -> np.ndarray:
    """SECONDS of a FREQ Hz sine sampled at ``rate``."""
    return amplitude * np.sin(2 * np.pi * FREQ * np.arange(int(rate * SECONDS)) / rate)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> str:
    sf.write(path, samples, rate, subtype="PCM_16")
    return str(path)


def pipeline_output(files: dict[str, str], **hparams) -> dict[str, np.ndarray]:
    """``sig`` of each utterance of ``files`` (id -> path) through the evaluation pipeline."""
    dataset = DynamicItemDataset({uid: {"wav": wav} for uid, wav in files.items()})
    data.add_audio_pipelines({"sample_rate": RATE, "speed_perturb": None, **hparams}, None,
                             [dataset])
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig"])
    return {item["id"]: item["sig"].numpy() for item in dataset}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """The same sine as 44.1 kHz, 8 kHz and 16 kHz mono WAV and 16 kHz stereo (0.8 / 0.4)."""
    return {
        "cd": write_wav(tmp_path / "cd.wav", sine(44100), 44100),
        "phone": write_wav(tmp_path / "phone.wav", sine(8000), 8000),
        "ref": write_wav(tmp_path / "ref.wav", sine(RATE), RATE),
        "stereo": write_wav(
            tmp_path / "stereo.wav", np.stack([sine(RATE, 0.8), sine(RATE, 0.4)], 1), RATE
        ),
    }


def test_any_rate_and_channels_become_the_configured_rate_in_mono(files, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mamba_asr.data"):
        sigs = pipeline_output(files)
    expected = sine(RATE)  # what a 16 kHz recording of the same tone holds
    for uid in ("cd", "phone", "ref"):
        sig = sigs[uid]
        assert sig.shape == expected.shape, uid  # 0.5 s at 16 kHz: 8000 samples
        spectrum = np.abs(np.fft.rfft(sig))
        assert np.fft.rfftfreq(len(sig), 1 / RATE)[spectrum.argmax()] == FREQ, uid
        inner = slice(200, -200)  # the resampler's filter sees zeros past the ends
        assert np.abs(sig[inner] - expected[inner]).max() < 1e-3, uid
    assert np.array_equal(sigs["ref"], sf.read(files["ref"], dtype="float32")[0])  # untouched
    assert np.abs(sigs["stereo"] - sine(RATE, 0.6)).max() < 1e-4  # the channels' mean
    assert [r.getMessage() for r in caplog.records] == [
        f"2 of 4 audio files are not at sample_rate 16000 Hz (1 at 8000 Hz, 1 at 44100 Hz; e.g. "
        f"{files['cd']}: 44100 Hz): they are resampled to 16000 Hz; 1 of 4 audio files have "
        f"several channels (e.g. {files['stereo']}: 2 channels): they are averaged to mono on "
        "loading"
    ]


def test_configured_rate_and_training_pipeline(files, caplog) -> None:
    """sample_rate 8000: the 8 kHz file is kept as it is, the others resampled; the training
    pipeline resamples before speed perturbation; all 16 kHz mono: no warning."""
    with caplog.at_level(logging.WARNING, logger="mamba_asr.data"):
        sigs = pipeline_output(files, sample_rate=8000)
    assert np.array_equal(sigs["phone"], sf.read(files["phone"], dtype="float32")[0])
    assert sigs["cd"].shape == sigs["ref"].shape == (4000,)
    assert "3 of 4 audio files are not at sample_rate 8000 Hz" in caplog.text

    caplog.clear()
    train = DynamicItemDataset({"cd": {"wav": files["cd"]}})
    halve = lambda sig: sig[:, ::2]  # noqa: E731  (a stand-in speed change, (1, samples))
    with caplog.at_level(logging.WARNING, logger="mamba_asr.data"):
        data.add_audio_pipelines({"sample_rate": RATE, "speed_perturb": halve}, train, [])
    sb.dataio.dataset.set_output_keys([train], ["sig"])
    assert train[0]["sig"].shape == (4000,)  # 8000 samples at 16 kHz, then halved
    assert "1 of 1 audio files are not at sample_rate 16000 Hz" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mamba_asr.data"):
        pipeline_output({"ref": files["ref"]})
    assert caplog.records == []


def test_missing_or_broken_audio_is_named(tmp_path: Path, files) -> None:
    missing = tmp_path / "gone.wav"
    with pytest.raises(FileNotFoundError, match=f"audio file {missing} of utterance u2 does "
                       "not exist"):
        pipeline_output({"u1": files["ref"], "u2": str(missing)})
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00")
    with pytest.raises(AudioHeaderError, match=f"audio file {broken} of utterance u3: "):
        pipeline_output({"u3": str(broken)})


def test_pipeline_reads_audio_as_transcription_does(tmp_path: Path, files) -> None:
    """A WAV cut short passes the header scan (libsndfile sizes it to what is there) but the
    pipeline does not decode it, as audio_io.load_audio does not: it gives the marker naming
    the file and the reason, which the loaders' collate function drops from the batch."""
    cut = tmp_path / "cut.wav"
    cut.write_bytes(Path(files["ref"]).read_bytes()[:44 + 1000])
    dataset = DynamicItemDataset({"u1": {"wav": files["ref"]}, "u2": {"wav": str(cut)}})
    data.add_audio_pipelines({"sample_rate": RATE, "speed_perturb": None}, None, [dataset])
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig"])
    items = {item["id"]: item["sig"] for item in dataset}
    assert items["u1"].shape == (int(RATE * SECONDS),)
    assert items["u2"] == UnreadableAudio(
        str(cut), "truncated: its header says 16000 bytes of audio, the file holds 1000"
    )
    with pytest.raises(AudioError, match=f"^{cut}: truncated: its header says 16000 bytes of "
                       "audio, the file holds 1000$"):
        load_audio(str(cut), RATE)
