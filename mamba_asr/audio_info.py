"""Audio header reading without decoding samples (FLAC STREAMINFO, soundfile otherwise)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import soundfile


class AudioInfo(NamedTuple):
    """Header facts of one audio file."""

    sample_rate: int
    channels: int
    num_frames: int


class AudioHeaderError(ValueError):
    """The file is empty, unreadable or not a valid audio file."""


_FLAC_MAGIC = b"fLaC"
_STREAMINFO_END = 42  # 4 magic + 4 block header + 34 STREAMINFO bytes


def _parse_streaminfo(head: bytes) -> AudioInfo | None:
    """Parse a FLAC file's first 42 bytes; None when its sample count is not recorded."""
    if head[4] & 0x7F != 0 or int.from_bytes(head[5:8], "big") != 34:
        raise AudioHeaderError("FLAC stream does not start with a STREAMINFO block")
    packed = int.from_bytes(head[18:26], "big")  # rate:20 channels-1:3 bps-1:5 samples:36
    sample_rate = packed >> 44
    channels = ((packed >> 41) & 0x7) + 1
    num_frames = packed & ((1 << 36) - 1)
    if sample_rate == 0:
        raise AudioHeaderError("FLAC STREAMINFO has sample rate 0")
    if num_frames == 0:
        return None
    return AudioInfo(sample_rate, channels, num_frames)


def read_audio_info(path: str) -> AudioInfo:
    """Read sample rate, channel count and length of ``path`` from its header only.

    FLAC files (all of LibriSpeech) are parsed directly from their STREAMINFO block,
    which costs one 42-byte read; other formats and FLAC streams that do not record
    their length go through soundfile. Raises AudioHeaderError for an empty,
    truncated or unrecognised file and OSError for an unreadable one.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.read(fd, _STREAMINFO_END)
    finally:
        os.close(fd)
    if not head:
        raise AudioHeaderError("zero-length file")
    if head.startswith(_FLAC_MAGIC):
        if len(head) < _STREAMINFO_END:
            raise AudioHeaderError(f"truncated FLAC header ({len(head)} bytes)")
        info = _parse_streaminfo(head)
        if info is not None:
            return info
    return _read_with_soundfile(path)


def _read_with_soundfile(path: str) -> AudioInfo:
    import soundfile  # imported lazily: the FLAC fast path needs no third-party code

    try:
        info = soundfile.info(path)
    except Exception as exc:  # soundfile raises its own error type or RuntimeError
        raise AudioHeaderError(f"not a readable audio file ({exc})") from exc
    frames = info.frames
    if frames <= 0:  # streams that do not record their length (rare)
        frames = count_decoded_frames(path)
    if frames <= 0:
        raise AudioHeaderError("audio file holds no samples")
    return AudioInfo(info.samplerate, info.channels, frames)


def decoded_blocks(
    sound: soundfile.SoundFile, blocksize: int = 1 << 16, dtype: str = "float32"
) -> Iterator[np.ndarray]:
    """The frames of an open file from its position on, as decoded, in (<= blocksize, channels)
    blocks; ends at the first short read, so a file that holds fewer frames than its header
    says yields only those (``soundfile.blocks`` repeats stale buffer contents up to the
    header's count instead). Raises soundfile's error when decoding fails."""
    while True:
        block = sound.read(blocksize, dtype=dtype, always_2d=True)
        if len(block):
            yield block
        if len(block) < blocksize:
            return


def count_decoded_frames(path: str) -> int:
    """Decode the whole file and count its frames (finds damage the header cannot show)."""
    import soundfile

    try:
        with soundfile.SoundFile(path) as sound:
            return sum(len(b) for b in decoded_blocks(sound, dtype="int16"))
    except Exception as exc:  # soundfile raises its own error type or RuntimeError
        raise AudioHeaderError(f"decoding failed ({exc})") from exc


def format_summary(files: Mapping[str, AudioInfo], sample_rate: int) -> str | None:
    """What loading ``files`` (path -> header facts) at ``sample_rate`` Hz mono changes: the
    count of files at another rate (by rate) and of multi-channel files, with an example of
    each; None when every file is ``sample_rate`` Hz mono."""
    rates: Counter[int] = Counter()
    examples: dict[str, str] = {}
    multichannel = 0
    for path, info in files.items():
        if info.sample_rate != sample_rate:
            rates[info.sample_rate] += 1
            examples.setdefault("rate", f"{path}: {info.sample_rate} Hz")
        if info.channels > 1:
            multichannel += 1
            examples.setdefault("channels", f"{path}: {info.channels} channels")
    parts = []
    if rates:
        by_rate = ", ".join(f"{n} at {rate} Hz" for rate, n in sorted(rates.items()))
        parts.append(
            f"{rates.total()} of {len(files)} audio files are not at sample_rate {sample_rate} "
            f"Hz ({by_rate}; e.g. {examples['rate']}): they are resampled to {sample_rate} Hz"
        )
    if multichannel:
        parts.append(
            f"{multichannel} of {len(files)} audio files have several channels (e.g. "
            f"{examples['channels']}): they are averaged to mono"
        )
    return "; ".join(parts) + " on loading" if parts else None
