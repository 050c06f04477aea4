"""Audio for transcription: any file libsndfile decodes, or audio already in memory, as one mono
float32 waveform at the model's sample rate; and the transcription command's inputs.

* :func:`load_audio` reads a file (WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF, ...; any rate,
  any channel count, 8 to 32-bit integer or 32/64-bit float samples) into a (samples,) tensor;
  also a file's bytes already in memory (:class:`AudioBytes`, e.g. read from a shard).
* :func:`prepare_waveform` does the same for a tensor or array already in memory.
* :func:`audio_duration` reads a file's length from its header, without decoding.
* :func:`expand_inputs` turns command-line arguments (files, folders, ``-`` for paths on
  standard input) into audio files; :func:`duplicate_stems` finds inputs whose outputs would
  share a name.

Every failure of a file is an :class:`AudioError` whose message is one line, ``<file>: <reason>``.
A file of digital silence is read as it is (zeros); a file that holds no samples at all is an
error. A file that decodes to fewer frames than its header says is truncated, except an MP3
without a Xing header, whose length libsndfile only estimates.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import soundfile
import torch
from speechbrain.dataio.preprocess import AudioNormalizer

from mamba_asr.audio_files import (  # noqa: F401  (re-exported: this module's interface)
    AUDIO_EXTENSIONS,
    CONVERT_EXTENSIONS,
    AudioError,
    audio_duration,
    check_samples,
    decode_mono,
    duplicate_stems,
    expand_inputs,
)

_INT_SCALES = {  # dtype: (offset, scale) mapping integer PCM samples to [-1, 1)
    torch.uint8: (128, 128), torch.int8: (0, 128), torch.int16: (0, 1 << 15),
    torch.int32: (0, 1 << 31),
}


@dataclass(frozen=True)
class AudioBytes:
    """An audio file's bytes as stored (FLAC, WAV, ...) and where they come from (``source``,
    e.g. ``<shard>:<utterance ID>``), which ``str()`` and errors name."""

    data: bytes = field(repr=False)
    source: str

    def __str__(self) -> str:
        return self.source


def load_audio(path: str | os.PathLike | AudioBytes, sample_rate: int) -> torch.Tensor:
    """The audio of ``path`` (or of :class:`AudioBytes`) as a mono float32 tensor of shape
    (samples,) at ``sample_rate``.

    Integer PCM is scaled to [-1, 1) by libsndfile, float samples are kept as stored;
    channels are averaged block by block while decoding (an hour of 6-channel audio never
    sits in memory whole), then the mono signal is resampled (SpeechBrain's
    ``AudioNormalizer``). Raises AudioError naming the file when it is missing, a folder,
    unreadable, empty, not audio, in a container libsndfile does not read, truncated or
    damaged, holds no samples, or holds NaN/infinite samples.
    """
    if isinstance(path, AudioBytes):
        mono, rate = _decode_bytes(path)
    else:
        mono, rate = decode_mono(Path(path))
    return _finish(str(path), mono, rate, sample_rate)


def _decode_bytes(audio: AudioBytes) -> tuple[np.ndarray, int]:
    """The mono mix of in-memory audio file bytes ((frames,) float32) and their rate;
    AudioError naming ``audio.source`` when libsndfile cannot decode them."""
    if not audio.data:
        raise AudioError(audio.source, "empty file (0 bytes)")
    try:
        samples, rate = soundfile.read(io.BytesIO(audio.data), dtype="float32", always_2d=True)
    except Exception as exc:  # LibsndfileError, or TypeError for headerless RAW
        reason = getattr(exc, "error_string", "") or str(exc)
        raise AudioError(audio.source, f"not audio libsndfile can decode ({reason})") from exc
    return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0], rate


def prepare_waveform(
    audio: torch.Tensor | np.ndarray, sr: int, sample_rate: int, source: str = "<waveform>"
) -> torch.Tensor:
    """In-memory audio, (samples,) or (samples, channels) as in SpeechBrain, at ``sr`` Hz, as
    :func:`load_audio` gives a file: mono float32 (samples,) at ``sample_rate``.

    Float samples are kept as they are; uint8/int8/int16/int32 PCM is scaled to [-1, 1).
    Raises AudioError (naming ``source``) for another shape or dtype, a 2-D input with more
    channels than samples (most likely (channels, samples): transpose it), no samples, a
    sample rate that is not a positive integer, or NaN/infinite samples.
    """
    x = torch.as_tensor(audio).detach().cpu()
    if x.ndim not in (1, 2):
        raise AudioError(source, f"shape {tuple(x.shape)}: expected (samples,) or "
                         "(samples, channels)")
    if x.ndim == 2 and x.shape[1] > x.shape[0]:
        raise AudioError(source, f"shape {tuple(x.shape)} has more channels than samples: "
                         "expected (samples, channels); transpose a (channels, samples) array")
    if x.dtype in _INT_SCALES:
        offset, scale = _INT_SCALES[x.dtype]
        x = (x.to(torch.float32) - offset) / scale
    elif x.is_floating_point():
        x = x.to(torch.float32)
    else:
        raise AudioError(source, f"samples of type {x.dtype}: expected float or uint8/int8/"
                         "int16/int32 PCM")
    if not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise AudioError(source, f"sample rate {sr!r}: expected a positive integer (Hz)")
    mono = x.mean(dim=1) if x.ndim == 2 else x
    return _finish(source, mono, int(sr), sample_rate)


def _finish(source: str, mono: torch.Tensor | np.ndarray, rate: int,
            sample_rate: int) -> torch.Tensor:
    """Mono float32 audio at ``rate`` checked (some samples, all finite) and resampled."""
    mono = torch.as_tensor(mono)
    check_samples(source, mono.numpy(), rate)
    return _normalizer(sample_rate)(mono, rate)


@cache
def _normalizer(sample_rate: int) -> AudioNormalizer:
    """One resampler set per target rate (AudioNormalizer caches a kernel per source rate)."""
    return AudioNormalizer(sample_rate=sample_rate, mix="avg-to-mono")


