"""Long recordings in one pass: the windowed feature normaliser (modules/normalization.py), the
chunked Fbank + CNN front-end (mamba_asr/long_audio.py) and the voice-activity segmentation
(mamba_asr/vad.py)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torchaudio
from conftest import DEMO_DATA, REPO
from hyperpyyaml import load_hyperpyyaml
from speechbrain.processing.features import InputNormalization
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.parameter_transfer import Pretrainer

from mamba_asr import vad
from mamba_asr.long_audio import chunked_fbank, frontend, peak_memory
from modules.normalization import WindowedInputNormalization

RATE = 16000
HOUR_FRAMES = 360_000  # 10 ms frames
N_MELS = 80  # ConMamba-S

# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "options", [{}, {"avoid_padding_norm": True}, {"std_norm": False}], ids=str
)
def test_windowed_is_sentence_normalisation_bitwise_up_to_the_window(options: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 50, 8) * 3 + 5
    lengths = torch.tensor([1.0, 0.7, 0.45])  # 50, 35 and 23 valid frames
    sentence = InputNormalization(norm_type="sentence", **options)(x, lengths)
    whole = WindowedInputNormalization(window_frames=50, **options)(x, lengths)
    assert torch.equal(whole, sentence)  # padding frames included
    mixed = WindowedInputNormalization(window_frames=35, **options)(x, lengths)
    assert torch.equal(mixed[1:], sentence[1:])  # rows of at most 35 valid frames
    assert not torch.allclose(mixed[0], sentence[0], atol=1e-3)  # the row of 50 is windowed


@pytest.mark.parametrize(
    "options", [{}, {"avoid_padding_norm": True}, {"std_norm": False}], ids=str
)
def test_long_rows_are_normalised_by_the_window_around_each_frame(options: dict) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 1000, 6) + torch.linspace(0, 10, 1000).view(1, -1, 1)  # a drifting mean
    width, valid = 200, (1000, 900)
    out = WindowedInputNormalization(window_frames=width, **options)(
        x, torch.tensor([1.0, 0.9])
    )
    sentence = InputNormalization(norm_type="sentence", **options)
    for row, n_valid in enumerate(valid):
        for t in [*range(0, 1000, 37), 99, 100, 101, 799, 800, 899, 900, 999]:
            start = min(max(t - width // 2, 0), n_valid - width)  # centred, inside the valid part
            if t < n_valid:
                window = sentence(x[row:row + 1, start:start + width], torch.ones(1))
                expected = window[0, t - start]
            elif options.get("avoid_padding_norm"):
                expected = x[row, t]
            else:  # padding frames take the last window's statistics
                window = x[row, start:start + width]
                std = window.std(0, unbiased=False) if options.get("std_norm", True) else 1.0
                expected = (x[row, t] - window.mean(0)) / std
            torch.testing.assert_close(out[row, t], expected, atol=2e-5, rtol=0)
    whole = sentence(x, torch.tensor([1.0, 0.9]))
    assert (out[0] - whole[0]).abs().mean() > 0.5  # the drift is taken out locally


def _hour_of_features() -> torch.Tensor:
    return torch.randn(1, HOUR_FRAMES, N_MELS)


def _normalise(feats: torch.Tensor) -> None:
    WindowedInputNormalization()(feats, torch.ones(1))


def test_an_hour_of_features_normalises_in_linear_small_memory() -> None:
    # The output is one copy of the input (115 MB); a (T, T) tensor would be 500 GB, and
    # float64 cumulative sums over the whole hour 230 MB each.
    peak = peak_memory(_normalise, _hour_of_features)
    size = HOUR_FRAMES * N_MELS * 4
    assert peak < 2 * size, f"{peak / 1e6:.0f} MB for {size / 1e6:.0f} MB of features"


def test_windowed_loads_the_recipes_normalizer_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(2)
    recipe = InputNormalization(norm_type="global", update_until_epoch=4)
    for _ in range(3):
        recipe(torch.randn(4, 30, 8) * 2 + 1, torch.ones(4), epoch=1)
    Checkpointer(tmp_path / "save", {"normalizer": recipe}).save_checkpoint()
    recipe.eval()
    x = torch.randn(2, 9000, 8)  # longer than the window: global statistics all the same

    resumed = WindowedInputNormalization(norm_type="global", update_until_epoch=4)
    Checkpointer(tmp_path / "save", {"normalizer": resumed}).recover_if_possible()
    assert resumed.count == recipe.count == 3 * 4 * 30  # frames seen
    assert torch.equal(resumed.eval()(x, torch.ones(2)), recipe(x, torch.ones(2)))

    # The way SpeechBrain's pretrained interfaces (EncoderASR...) load a model folder.
    ckpt = next((tmp_path / "save").glob("CKPT+*")) / "normalizer.ckpt"
    exported = WindowedInputNormalization(norm_type="global")
    pretrainer = Pretrainer(
        collect_in=tmp_path / "collect", loadables={"normalizer": exported},
        paths={"normalizer": str(ckpt)},
    )
    pretrainer.collect_files()
    pretrainer.load_collected()
    assert torch.equal(exported.eval()(x, torch.ones(2)), recipe(x, torch.ones(2)))
    assert exported.state_dict().keys() == recipe.state_dict().keys()


def test_windowed_rejects_what_it_cannot_window() -> None:
    with pytest.raises(ValueError, match="norm_type 'batch'"):
        WindowedInputNormalization(norm_type="batch")
    with pytest.raises(ValueError, match="window_frames must be a positive number.*got 0"):
        WindowedInputNormalization(window_frames=0)
    with pytest.raises(ValueError, match="length_dim must be 1"):
        WindowedInputNormalization(length_dim=2)


# --------------------------------------------------------------------------- front-end


def _config(name: str, output_folder: Path) -> dict:
    with open(REPO / "hparams" / "CTC" / f"{name}.yaml", encoding="utf-8") as f:
        return load_hyperpyyaml(
            f, {"data_folder": str(output_folder), "output_folder": str(output_folder)}
        )


def _recording(seconds: float, seed: int = 3) -> torch.Tensor:
    """(1, samples) of noise with 4 s of digital silence and a second 60 dB quieter, so that
    the Fbank's dB floor (80 dB below the loudest bin of the recording) is reached."""
    torch.manual_seed(seed)
    wav = torch.randn(1, int(seconds * RATE)) * 0.1
    wav[:, 5 * RATE:9 * RATE] = 0
    wav[:, 20 * RATE:21 * RATE] *= 1e-3
    return wav


@pytest.mark.parametrize("name", ["demo", "conmamba_small"])
def test_chunked_frontend_equals_one_call(name: str, tmp_path: Path) -> None:
    hparams = _config(name, tmp_path)
    fbank, cnn = hparams["compute_features"], hparams["CNN"].eval()
    normalize = WindowedInputNormalization(window_frames=1000)  # the file is 3732 frames long
    wav = _recording(37.31)
    with torch.no_grad():
        expected = cnn(normalize(fbank(wav), torch.ones(1)))
    assert expected.shape[1] == 933  # ceil(3732 / 4)
    for chunk_frames in (997, 1234):  # neither divides 3732, nor is a multiple of 4
        got = frontend(fbank, normalize, cnn, wav, chunk_frames=chunk_frames)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_chunked_fbank_keeps_the_recordings_db_floor(tmp_path: Path) -> None:
    fbank = _config("demo", tmp_path)["compute_features"]
    wav = _recording(12.0)
    expected = fbank(wav)
    got = chunked_fbank(fbank, wav, chunk_frames=100)  # chunks 4 s inside the silence
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    silence = got[0, 520:880]
    assert torch.equal(silence, torch.full_like(silence, float(expected.max()) - 80.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Fbank keeps to float32 under autocast
        torch.testing.assert_close(chunked_fbank(fbank, wav, 100), expected, atol=1e-4, rtol=0)


def test_frontend_rejects_what_it_cannot_chunk(tmp_path: Path) -> None:
    hparams = _config("demo", tmp_path)
    fbank, cnn = hparams["compute_features"], hparams["CNN"]
    normalize = WindowedInputNormalization()
    with pytest.raises(ValueError, match="training mode"):
        frontend(fbank, normalize, cnn.train(), _recording(31.0))
    with pytest.raises(ValueError, match=r"wav must be \(batch, samples\), got shape \(16000,\)"):
        frontend(fbank, normalize, cnn.eval(), torch.zeros(RATE))
    with pytest.raises(ValueError, match="chunk_frames must be a positive number.*got 0"):
        frontend(fbank, normalize, cnn.eval(), torch.zeros(1, RATE), chunk_frames=0)


def _build_frontend(output_folder: str, seconds: float) -> tuple:
    hparams = _config("conmamba_small", Path(output_folder))
    return (hparams["compute_features"], WindowedInputNormalization(), hparams["CNN"].eval(),
            _recording(seconds))


def _run_chunked(parts: tuple) -> None:
    frontend(*parts, chunk_frames=1000)


def _run_one_call(parts: tuple) -> None:
    fbank, normalize, cnn, wav = parts
    with torch.no_grad():
        cnn(normalize(fbank(wav), torch.ones(1)))


@pytest.mark.slow
def test_chunked_frontend_memory_is_set_by_the_chunk(tmp_path: Path) -> None:
    setup = functools.partial(_build_frontend, str(tmp_path), 240.0)  # 4 minutes, ConMamba-S
    chunked, one_call = peak_memory(_run_chunked, setup), peak_memory(_run_one_call, setup)
    assert chunked < 0.25 * one_call, f"{chunked / 1e6:.0f} MB vs {one_call / 1e6:.0f} MB"


# --------------------------------------------------------------------------- VAD

JOIN = 0.2  # seconds between the two utterances of a region: shorter than vad.MIN_SILENCE_MS
SILENCE = 1.5  # seconds between regions


def _demo_utterances(count: int) -> list[torch.Tensor]:
    """``count`` demo test utterances of 1.5 to 3 s, trimmed to their speech."""
    files = sorted((DEMO_DATA / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))
    if not files:
        pytest.skip(f"the demo corpus is not generated ({DEMO_DATA})")
    utterances = []
    for path in files:
        audio, rate = sf.read(path, dtype="float32")
        assert rate == RATE
        speech = torch.from_numpy(audio).abs().gt(0.01).nonzero().flatten()
        trimmed = torch.from_numpy(audio[int(speech[0]):int(speech[-1]) + 1])
        if 1.5 * RATE <= len(trimmed) <= 3 * RATE:
            utterances.append(trimmed)
        if len(utterances) == count:
            return utterances
    pytest.skip("the demo corpus has too few utterances of 1.5 to 3 s")


def _cover(segments: list[tuple[int, int]], n_samples: int) -> torch.Tensor:
    covered = torch.zeros(n_samples, dtype=torch.bool)
    for start, end in segments:
        covered[start:end] = True
    return covered


def test_speech_segments_cover_the_utterances_within_max_seconds() -> None:
    first, second, third = _demo_utterances(3)
    silence, join = torch.zeros(int(SILENCE * RATE)), torch.zeros(int(JOIN * RATE))
    pieces = [silence, first, join, second, silence, third, silence]
    wav = torch.cat(pieces)
    speech = wav.abs() > 0.01
    ends = torch.tensor([len(piece) for piece in pieces]).cumsum(0).tolist()
    silences = [(0, ends[0]), (ends[3], ends[4]), (ends[5], ends[6])]
    # Long enough for either utterance with the padding, too short for both: a cut is needed.
    max_seconds = (max(len(first), len(second)) / RATE) + JOIN + 2 * vad.PAD_MS / 1000
    for limit in (30.0, max_seconds):
        segments = vad.speech_segments(wav, RATE, limit)
        covered = _cover(segments, len(wav))
        assert all(0 <= s < e <= t for (s, e), (t, _) in zip(segments, segments[1:], strict=False))
        assert segments[-1][1] <= len(wav)
        assert all(end - start <= limit * RATE for start, end in segments)
        assert (covered & speech).sum() >= 0.99 * speech.sum()
        for start, end in silences:  # the middle of each long silence is not speech
            middle = (start + end) // 2
            assert not covered[middle - RATE // 4:middle + RATE // 4].any()
    pairs = zip(segments, segments[1:], strict=False)
    cuts = [end for (_, end), (start, _) in pairs if end == start]
    assert cuts  # the first region was split, in a pause: silence around each cut
    level = wav[speech].square().mean().sqrt()
    for cut in cuts:
        assert wav[cut - 256:cut + 256].square().mean().sqrt() < 0.05 * level

    # Another sample rate: the same segments, in that rate's samples.
    cd = torchaudio.functional.resample(wav, RATE, 44100)
    resampled = vad.speech_segments(cd, 44100, max_seconds)
    assert len(resampled) == len(segments)
    for (start, end), (cd_start, cd_end) in zip(segments, resampled, strict=True):
        assert abs(cd_start / 44100 - start / RATE) < 0.1
        assert abs(cd_end / 44100 - end / RATE) < 0.1


def test_vad_keeps_torch_thread_count(monkeypatch) -> None:
    # Importing silero_vad sets torch to one thread: a fresh import is checked.
    for module in [m for m in sys.modules if m == "silero_vad" or m.startswith("silero_vad.")]:
        monkeypatch.delitem(sys.modules, module)
    vad.vad_model.cache_clear()
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        vad.vad_model()
        assert torch.get_num_threads() == 3
        torch.manual_seed(4)
        vad.speech_segments(torch.randn(RATE) * 0.1, RATE, 10.0)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_speech_segments_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"float tensor \(samples,\), got \(1, 16000\)"):
        vad.speech_segments(torch.zeros(1, RATE), RATE, 10.0)
    with pytest.raises(ValueError, match="sample_rate must be a positive int, got 16000.0"):
        vad.speech_segments(torch.zeros(RATE), 16000.0, 10.0)
    with pytest.raises(ValueError, match="max_seconds must be a positive number.*got 0"):
        vad.speech_segments(torch.zeros(RATE), RATE, 0)
    assert vad.speech_segments(torch.zeros(100), RATE, 10.0) == []  # less than a VAD frame
