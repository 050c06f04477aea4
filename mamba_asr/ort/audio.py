"""Audio for the PyTorch-free runtime: a file or an in-memory array as one mono float32 NumPy
array (samples,) at the model's rate, with the errors of :mod:`mamba_asr.audio_io`
(:class:`~mamba_asr.audio_files.AudioError`, ``<file>: <reason>``); resampling by SciPy's
polyphase filter instead of SpeechBrain's."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from mamba_asr.audio_files import AudioError, check_samples, decode_mono

_INT_SCALES = {  # dtype: (offset, scale) mapping integer PCM samples to [-1, 1)
    np.dtype(np.uint8): (128, 128), np.dtype(np.int8): (0, 128),
    np.dtype(np.int16): (0, 1 << 15), np.dtype(np.int32): (0, 1 << 31),
}


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``audio`` (samples,) from ``rate`` to ``target`` Hz as float32 (itself when equal)."""
    if rate == target:
        return audio
    from scipy.signal import resample_poly  # 0.5 s to import: only when a rate differs

    common = math.gcd(rate, target)
    return resample_poly(audio, target // common, rate // common).astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """The audio of ``path`` as mono float32 (samples,) at ``sample_rate``: what
    :func:`mamba_asr.audio_io.load_audio` reads, the same AudioErrors."""
    mono, rate = decode_mono(Path(path))
    check_samples(str(path), mono, rate)
    return resample(mono, rate, sample_rate)


def prepare_waveform(audio: np.ndarray, sr: int, sample_rate: int,
                     source: str = "<waveform>") -> np.ndarray:
    """In-memory audio, (samples,) or (samples, channels), at ``sr`` Hz as mono float32
    (samples,) at ``sample_rate``: :func:`mamba_asr.audio_io.prepare_waveform` for NumPy."""
    x = np.asarray(audio)
    if x.ndim not in (1, 2):
        raise AudioError(source, f"shape {x.shape}: expected (samples,) or (samples, channels)")
    if x.ndim == 2 and x.shape[1] > x.shape[0]:
        raise AudioError(source, f"shape {x.shape} has more channels than samples: "
                         "expected (samples, channels); transpose a (channels, samples) array")
    if x.dtype in _INT_SCALES:
        offset, scale = _INT_SCALES[x.dtype]
        x = (x.astype(np.float32) - offset) / scale
    elif x.dtype.kind == "f":
        x = x.astype(np.float32)
    else:
        raise AudioError(source, f"samples of type {x.dtype}: expected float or uint8/int8/"
                         "int16/int32 PCM")
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise AudioError(source, f"sample rate {sr!r}: expected a positive integer (Hz)")
    mono = x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x
    check_samples(source, mono, int(sr))
    return resample(mono, int(sr), sample_rate)
