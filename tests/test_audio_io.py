"""audio_io: any file libsndfile decodes (format, sample type, rate, channels) read as one mono
16 kHz waveform matching the same signal sampled at 16 kHz; one-line errors naming the file for
every bad input; in-memory audio; the command line's inputs (folders, ``-``, duplicate stems)."""

from __future__ import annotations

import builtins
import errno
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mamba_asr.audio_io import (
    AudioError,
    audio_duration,
    duplicate_stems,
    expand_inputs,
    load_audio,
    prepare_waveform,
)

RATE = 16000
SECONDS = 1.0


def signal(rate: int) -> np.ndarray:
    """SECONDS of a 440 Hz tone plus a 100 Hz -> 3 kHz chirp (below 8 kHz files' Nyquist),
    sampled at ``rate``: every file below holds this same sound."""
    t = np.arange(int(rate * SECONDS)) / rate
    chirp = np.sin(2 * np.pi * (100 * t + (3000 - 100) / (2 * SECONDS) * t**2))
    return 0.3 * np.sin(2 * np.pi * 440 * t) + 0.3 * chirp


REFERENCE = signal(RATE)
INNER = slice(100, -100)  # the resampler's filter sees zeros past the ends


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def write(path: Path, samples: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    fmt = "OGG" if path.suffix == ".opus" else None  # soundfile writes by extension
    sf.write(path, samples, rate, subtype=subtype, format=fmt)
    return path


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(("name", "subtype", "max_error"), [
    ("u8.wav", "PCM_U8", 1 / 128),  # one quantisation step of each sample type
    ("pcm16.wav", "PCM_16", 1 / 32768),
    ("pcm24.wav", "PCM_24", 2**-23),
    ("pcm32.wav", "PCM_32", 1e-7),  # float32's rounding
    ("float.wav", "FLOAT", 1e-7),
    ("double.wav", "DOUBLE", 1e-7),
    ("pcm16.flac", "PCM_16", 1 / 32768),
    ("pcm24.flac", "PCM_24", 2**-23),
    ("pcm16.aiff", "PCM_16", 1 / 32768),
])
def test_pcm_and_float_files_at_16k_are_read_exactly(tmp_path, name, subtype, max_error):
    sig = load_audio(write(tmp_path / name, REFERENCE, RATE, subtype), RATE)
    assert sig.dtype == torch.float32 and sig.shape == (16000,)
    assert np.abs(sig.numpy() - REFERENCE).max() <= max_error


@pytest.mark.parametrize(("name", "subtype", "rate", "min_correlation"), [
    ("vorbis.ogg", "VORBIS", 16000, 0.998),
    ("opus.ogg", "OPUS", 48000, 0.99),
    ("opus16.opus", "OPUS", 16000, 0.99),
    ("mp3_16k.mp3", "MPEG_LAYER_III", 16000, 0.999),
    ("mp3_44k.mp3", "MPEG_LAYER_III", 44100, 0.999),
])
def test_lossy_files_match_the_signal(tmp_path, name, subtype, rate, min_correlation):
    sig = load_audio(write(tmp_path / name, signal(rate), rate, subtype), RATE).numpy()
    assert sig.shape == (16000,)  # the decoders drop their encoder delay and padding
    assert correlation(sig, REFERENCE) > min_correlation


@pytest.mark.parametrize(("rate", "max_error"), [(8000, 1e-2), (22050, 1e-3), (44100, 1e-3),
                                                 (48000, 1e-3)])
def test_other_rates_are_resampled_to_16k(tmp_path, rate, max_error):
    sig = load_audio(write(tmp_path / f"{rate}.flac", signal(rate), rate, "PCM_24"), RATE)
    assert sig.shape == (16000,)
    assert np.abs(sig.numpy()[INNER] - REFERENCE[INNER]).max() < max_error
    assert correlation(sig.numpy(), REFERENCE) > 0.9999


def test_channels_are_averaged(tmp_path):
    stereo = write(tmp_path / "stereo.wav", np.stack([0.8 * REFERENCE, 0.4 * REFERENCE], 1),
                   RATE, "PCM_24")
    assert np.abs(load_audio(stereo, RATE).numpy() - 0.6 * REFERENCE).max() < 1e-6
    gains = np.array([1.0, 0.5, 0.25, 0.0, -0.25, 0.5])  # 5.1 at 44.1 kHz: mean gain 1/3
    six = write(tmp_path / "six.wav", signal(44100)[:, None] * gains, 44100, "FLOAT")
    sig = load_audio(six, RATE).numpy()
    assert sig.shape == (16000,)
    assert np.abs(sig[INNER] - REFERENCE[INNER] / 3).max() < 1e-3


def test_silence_is_audio_and_the_content_decides_the_format(tmp_path):
    silence = load_audio(write(tmp_path / "silence.wav", np.zeros(8000), 8000, "PCM_16"), RATE)
    assert silence.shape == (16000,) and not silence.any()
    misnamed = tmp_path / "really_a.m4a"
    misnamed.write_bytes(write(tmp_path / "a.wav", REFERENCE, RATE, "PCM_16").read_bytes())
    assert np.abs(load_audio(misnamed, RATE).numpy() - REFERENCE).max() <= 1 / 32768


def test_audio_duration_from_the_header(tmp_path):
    assert audio_duration(write(tmp_path / "a.flac", signal(22050), 22050)) == 1.0
    assert audio_duration(write(tmp_path / "b.wav", np.zeros(12000), 8000)) == 1.5
    assert audio_duration(write(tmp_path / "c.mp3", signal(RATE), RATE)) == 1.0
    with pytest.raises(AudioError, match=f"^{tmp_path / 'gone.wav'}: no such file$"):
        audio_duration(tmp_path / "gone.wav")
    (tmp_path / "notes.wav").write_text("not audio\n")
    with pytest.raises(AudioError, match=f"^{tmp_path / 'notes.wav'}: a text file, not audio$"):
        audio_duration(tmp_path / "notes.wav")


# --------------------------------------------------------------------------- bad files


def error_of(path: Path) -> str:
    """load_audio's error message for ``path``, checked to be one line naming the file."""
    with pytest.raises(AudioError) as info:
        load_audio(path, RATE)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


def test_missing_folder_empty_text_and_random_files(tmp_path):
    assert error_of(tmp_path / "gone.flac") == "no such file"
    assert error_of(tmp_path) == "is a folder, not an audio file"
    (tmp_path / "empty.wav").write_bytes(b"")
    assert error_of(tmp_path / "empty.wav") == "empty file (0 bytes)"
    (tmp_path / "list.wav").write_text("a.wav\nb.wav\n")
    assert error_of(tmp_path / "list.wav") == "a text file, not audio"
    (tmp_path / "noise.flac").write_bytes(np.random.default_rng(0).bytes(4000))
    assert error_of(tmp_path / "noise.flac") == (
        "not an audio file libsndfile can read (Format not recognised)")


@pytest.mark.parametrize("suffix", [".m4a", ".aac", ".webm", ".mp4", ".wma"])
def test_containers_libsndfile_does_not_read_say_how_to_convert(tmp_path, suffix):
    path = tmp_path / f"talk{suffix}"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    assert error_of(path).endswith(
        f"is not a format libsndfile reads; convert it first, e.g. ffmpeg -i {path} "
        f"{tmp_path / 'talk.flac'}")
    assert error_of(path).startswith(f"{suffix} (")


def test_truncated_and_header_only_files(tmp_path):
    wav = write(tmp_path / "full.wav", REFERENCE, RATE, "PCM_16").read_bytes()
    (tmp_path / "cut.wav").write_bytes(wav[:44 + 1000])
    assert error_of(tmp_path / "cut.wav") == (
        "truncated: its header says 32000 bytes of audio, the file holds 1000")
    (tmp_path / "header.wav").write_bytes(wav[:44])
    assert error_of(tmp_path / "header.wav") == (
        "truncated: its header says 32000 bytes of audio, the file holds 0")
    flac = write(tmp_path / "full.flac", REFERENCE, RATE, "PCM_16").read_bytes()
    (tmp_path / "cut.flac").write_bytes(flac[: len(flac) // 2])
    assert error_of(tmp_path / "cut.flac") == (
        "damaged or truncated: decoding failed (flac decoder lost sync)")
    mp3 = write(tmp_path / "full.mp3", REFERENCE, RATE).read_bytes()
    (tmp_path / "cut.mp3").write_bytes(mp3[: len(mp3) // 2])
    assert error_of(tmp_path / "cut.mp3").startswith("truncated: its header says 1.00 s, only 0.")
    ogg = write(tmp_path / "full.ogg", REFERENCE, RATE).read_bytes()
    (tmp_path / "cut.ogg").write_bytes(ogg[: len(ogg) // 2])
    assert error_of(tmp_path / "cut.ogg") == (
        "damaged or truncated: cannot be opened (Supported file format but file is malformed)")


def test_an_estimated_mp3_length_is_not_a_truncation(tmp_path):
    """Without its Xing header a VBR MP3's length is estimated from its first frame (here from
    a second of silence at the lowest bitrate: over 3x too long): what decodes is the audio."""
    t = np.arange(5 * RATE) / RATE
    noise = 0.5 * np.random.default_rng(0).standard_normal(len(t))
    mp3 = write(tmp_path / "vbr.mp3", np.where(t < 1, 0.0, noise), RATE).read_bytes()
    second_frame = next(i for i in range(4, len(mp3)) if mp3[i] == 0xFF and mp3[i + 1] >= 0xE0)
    (tmp_path / "no_xing.mp3").write_bytes(mp3[second_frame:])  # the Xing header is frame 1
    assert sf.info(tmp_path / "no_xing.mp3").frames > 3 * len(t)
    assert abs(len(load_audio(tmp_path / "no_xing.mp3", RATE)) - len(t)) < 2 * 1152


def test_a_wav_written_to_a_pipe_is_read_whole(tmp_path):
    """A streamed WAV's header holds 0xFFFFFFFF for the unknown length: not a truncation."""
    wav = bytearray(write(tmp_path / "full.wav", REFERENCE, RATE, "PCM_16").read_bytes())
    wav[4:8] = wav[40:44] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "piped.wav").write_bytes(wav)
    assert np.abs(load_audio(tmp_path / "piped.wav", RATE).numpy() - REFERENCE).max() < 1 / 32768


def test_no_samples_and_non_finite_samples(tmp_path):
    write(tmp_path / "zero.wav", np.zeros(0), RATE, "PCM_16")
    assert error_of(tmp_path / "zero.wav") == "holds no audio samples (0 frames in a 44-byte file)"
    for bad, name in [(np.nan, "nan.wav"), (np.inf, "inf.wav")]:
        samples = REFERENCE.copy()
        samples[4000] = bad  # at 0.25 s
        write(tmp_path / name, samples, RATE, "FLOAT")
        assert error_of(tmp_path / name) == (
            "holds NaN or infinite samples (the first at 0.250 s); audio samples must be finite")


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path / "locked.wav", REFERENCE, RATE, "PCM_16")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads it anyway: open() refuses as the OS would
        real_open = builtins.open

        def refusing(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing)
    assert error_of(path) == "cannot be read: permission denied"


def test_audio_error_survives_pickling():
    """Worker processes hand errors back pickled."""
    error = pickle.loads(pickle.dumps(AudioError("a.wav", "empty file (0 bytes)")))
    assert (str(error), error.source, error.reason) == (
        "a.wav: empty file (0 bytes)", "a.wav", "empty file (0 bytes)")


# --------------------------------------------------------------------------- in memory


def test_prepare_waveform_matches_load_audio(tmp_path):
    stereo = np.stack([signal(44100), 0.5 * signal(44100)], 1)  # (samples, channels)
    path = write(tmp_path / "s.wav", stereo, 44100, "FLOAT")
    from_file = load_audio(path, RATE)
    for audio in (stereo, torch.from_numpy(stereo), stereo.astype(np.float32)):
        assert torch.allclose(prepare_waveform(audio, 44100, RATE), from_file, atol=1e-6)
    pcm16 = np.round(REFERENCE * 32768).astype(np.int16)
    assert np.abs(prepare_waveform(pcm16, RATE, RATE).numpy() - REFERENCE).max() < 1 / 32768
    u8 = np.round(REFERENCE * 128 + 128).astype(np.uint8)
    assert np.abs(prepare_waveform(u8, RATE, RATE).numpy() - REFERENCE).max() < 1 / 128


@pytest.mark.parametrize(("audio", "sr", "reason"), [
    (np.zeros((2, 16000)), RATE, "shape (2, 16000) has more channels than samples: expected "
     "(samples, channels); transpose a (channels, samples) array"),
    (np.zeros((1, 2, 16000)), RATE, "shape (1, 2, 16000): expected (samples,) or "
     "(samples, channels)"),
    (np.zeros(100, dtype=np.int64), RATE, "samples of type torch.int64: expected float or "
     "uint8/int8/int16/int32 PCM"),
    (np.zeros(100), 0, "sample rate 0: expected a positive integer (Hz)"),
    (np.zeros(100), 16000.0, "sample rate 16000.0: expected a positive integer (Hz)"),
    (np.zeros(0), RATE, "holds no audio samples"),
    (np.array([0.0, np.nan, 0.0]), RATE, "holds NaN or infinite samples (the first at 0.000 s); "
     "audio samples must be finite"),
])
def test_prepare_waveform_refuses(audio, sr, reason):
    with pytest.raises(AudioError) as info:
        prepare_waveform(audio, sr, RATE, source="mic")
    assert str(info.value) == f"mic: {reason}"


# --------------------------------------------------------------------------- inputs


def test_expand_inputs_files_folders_and_stdin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["talks/b.flac", "talks/a.WAV", "talks/sub/c.mp3", "talks/sub/notes.txt",
                 "talks/.hidden.wav", "talks/.cache/d.wav", "talks/e.m4a", "one.ogg",
                 "listed.wav", "empty/readme.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    stdin = io.StringIO("listed.wav\r\n\n   \ntalks/b.flac\nnowhere.wav\n")
    paths, errors = expand_inputs(["one.ogg", "talks", "-", "empty", "gone.wav", "one.ogg"],
                                  stdin)
    assert paths == [Path(p) for p in ["one.ogg", "talks/a.WAV", "talks/b.flac", "talks/e.m4a",
                                       "talks/sub/c.mp3", "listed.wav"]]
    assert [str(e) for e in errors] == [
        "nowhere.wav: no such file or folder",
        "empty: folder holds no audio files (searched for .aif, .aifc, .aiff, .au, .caf, .flac, "
        ".mp3, .oga, .ogg, .opus, .rf64, .snd, .w64, .wav, .wave)",
        "gone.wav: no such file or folder",
    ]
    with pytest.raises(ValueError, match="- reads paths from standard input, but there is none"):
        expand_inputs(["-"], None)


def test_duplicate_stems():
    paths = [Path("a/x.wav"), Path("b/x.flac"), Path("y.wav"), Path("c/X.mp3"), Path("z.tar.gz"),
             Path("z.tar.wav")]
    assert duplicate_stems(paths) == {
        "x": [Path("a/x.wav"), Path("b/x.flac"), Path("c/X.mp3")],
        "z.tar": [Path("z.tar.gz"), Path("z.tar.wav")],  # both would write z.tar.<format>
    }
    assert duplicate_stems(paths[:3:2]) == {}
