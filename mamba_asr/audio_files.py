"""Audio files for transcription without a tensor library: decoding any file libsndfile reads
into one mono float32 NumPy array at its own rate, with a clear error for every file that
cannot be transcribed, and the transcription command's inputs (files, folders, ``-``).

Shared by :mod:`mamba_asr.audio_io` (torch tensors, SpeechBrain's resampler) and the
PyTorch-free runtime :mod:`mamba_asr.ort.audio`.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import soundfile

from mamba_asr.audio_info import AudioHeaderError, decoded_blocks, read_audio_info

# What a folder given as input is searched for: the extensions of the containers libsndfile
# reads, and those of common formats it does not (they are reported, with how to convert them).
AUDIO_EXTENSIONS = (
    ".aif", ".aifc", ".aiff", ".au", ".caf", ".flac", ".mp3", ".oga", ".ogg", ".opus", ".rf64",
    ".snd", ".w64", ".wav", ".wave",
)
CONVERT_EXTENSIONS = {
    ".3gp": "3GP", ".aac": "AAC", ".amr": "AMR", ".m4a": "MP4/AAC", ".mkv": "Matroska",
    ".mov": "QuickTime", ".mp4": "MP4", ".webm": "WebM", ".wma": "WMA",
}
BLOCK_FRAMES = 1 << 16  # frames decoded at a time: only the mono mix of a block is kept
# Frames reserved up front from the header's count (2 GiB of address space, touched only as
# filled: 9 h at 16 kHz); a longer file or a bogus header count goes on in further blocks.
PREALLOCATED_FRAMES = 1 << 29
# An MP3's length is exact only from a VBR (Xing) header, which libsndfile's log shows as
# "bitrate mode : variable"; otherwise it is estimated from the file's size and first frame.
_MP3_EXACT_LENGTH = re.compile(r"^\s*bitrate mode\s*:\s*variable", re.M)
MP3_FRAME = 1152  # samples of one MPEG-1 layer III frame: the slack allowed on an exact length
_STREAMING_SIZES = (0xFFFFFFFF, 0x7FFFFFFF)  # data sizes of WAVs written to a pipe
# libsndfile's log line for a chunk whose header size is not what the file holds
_CHUNK_SIZE_LOG = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
class AudioError(ValueError):
    """An input that cannot be transcribed; ``str()`` is one line, ``<source>: <reason>``."""

    def __init__(self, source: str | os.PathLike, reason: str) -> None:
        self.source = str(source)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.source}: {self.reason}")

    def __reduce__(self):  # picklable (worker processes) although __init__ takes two arguments
        return (type(self), (self.source, self.reason))


def audio_duration(path: str | os.PathLike) -> float:
    """Seconds of audio in ``path`` from its header only (no decoding), for sorting inputs by
    length; raises AudioError for a file :func:`load_audio` would refuse at opening."""
    path = Path(path)
    head = _read_head(path)
    try:
        info = read_audio_info(str(path))
    except (AudioHeaderError, OSError) as exc:
        _open_sound(path, head).close()  # raises the reason load_audio would give
        raise AudioError(path, str(exc)) from exc
    return info.num_frames / info.sample_rate


def expand_inputs(
    args: Sequence[str], stdin: TextIO | None
) -> tuple[list[Path], list[AudioError]]:
    """The audio files named by command-line ``args``, in order, each once, and the errors of
    the arguments that name none.

    A file is taken as given (whatever its extension; loading judges it). A folder is searched
    recursively for files with an extension of ``AUDIO_EXTENSIONS`` or ``CONVERT_EXTENSIONS``
    (any case; hidden files and folders skipped; sorted by path). ``-`` reads one path per
    line from ``stdin`` (a line is the path as written; blank lines are skipped), each
    expanded the same way. A missing path, an empty folder or one that cannot be listed is an
    AudioError in the second list, so that the caller reports it and goes on with the rest.
    Raises ValueError for ``-`` without ``stdin``.
    """
    paths: list[Path] = []
    errors: list[AudioError] = []
    seen: set[Path] = set()
    for name in _input_names(args, stdin):
        path = Path(name)
        if path.is_dir():
            found, unlistable = _audio_files(path)
            errors += unlistable
            if not found and not unlistable:
                errors.append(AudioError(path, "folder holds no audio files (searched for "
                                         f"{', '.join(AUDIO_EXTENSIONS)})"))
        elif path.exists():
            found = [path]
        else:
            errors.append(AudioError(path, "no such file or folder"))
            found = []
        for file in found:
            if (key := file.resolve()) not in seen:
                seen.add(key)
                paths.append(file)
    return paths, errors


def duplicate_stems(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """Inputs whose outputs would share a name in one folder (``<stem>.<format>``): stem (as
    the first such input spells it) -> the inputs, for stems shared by two or more. Stems are
    compared ignoring case, as case-insensitive file systems (macOS, Windows) would."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(path.stem.casefold(), []).append(path)
    return {group[0].stem: group for group in groups.values() if len(group) > 1}


# --------------------------------------------------------------------------- decoding


def decode_mono(path: Path) -> tuple[np.ndarray, int]:
    """The mono mix of ``path`` at its own rate ((frames,) float32) and that rate."""
    head = _read_head(path)
    with _open_sound(path, head) as sound:
        _check_chunk_sizes(path, sound)
        expected, channels, rate = sound.frames, sound.channels, sound.samplerate
        mono = np.empty(min(max(expected, 0), PREALLOCATED_FRAMES), dtype=np.float32)
        done, extra = 0, []
        try:
            for block in decoded_blocks(sound, BLOCK_FRAMES):
                mix = block[:, 0] if channels == 1 else block.mean(axis=1)
                fits = min(len(mix), len(mono) - done)
                mono[done:done + fits] = mix[:fits]
                done += fits
                if fits < len(mix):  # more frames than the header said
                    extra.append(mix[fits:])
        except soundfile.LibsndfileError as exc:
            raise AudioError(path, "damaged or truncated: decoding failed "
                             f"({_libsndfile_reason(exc)})") from exc
        if done < expected - _length_slack(sound):
            raise AudioError(path, f"truncated: its header says {expected / rate:.2f} s, only "
                             f"{done / rate:.2f} s could be decoded")
    if not done and not extra:
        raise AudioError(path, f"holds no audio samples (0 frames in a "
                         f"{path.stat().st_size}-byte file)")
    return np.concatenate([mono[:done], *extra]) if extra else mono[:done], rate


def _length_slack(sound: soundfile.SoundFile) -> float:
    """How many frames fewer than the header's count decoding may give before the file is
    taken for truncated: none, a frame for an MP3 with an exact length, and any number for
    an MP3 whose length is an estimate (a VBR stream without a Xing header)."""
    if sound.format != "MP3":
        return 0
    return MP3_FRAME if _MP3_EXACT_LENGTH.search(sound.extra_info) else float("inf")


def _read_head(path: Path) -> bytes:
    """The first bytes of ``path``; AudioError when it is missing, a folder, unreadable or
    empty."""
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except FileNotFoundError as exc:
        raise AudioError(path, "no such file") from exc
    except IsADirectoryError as exc:
        raise AudioError(path, "is a folder, not an audio file") from exc
    except PermissionError as exc:
        raise AudioError(path, "cannot be read: permission denied") from exc
    except OSError as exc:
        raise AudioError(path, f"cannot be read: {exc.strerror or exc}") from exc
    if not head:
        raise AudioError(path, "empty file (0 bytes)")
    return head


def _open_sound(path: Path, head: bytes) -> soundfile.SoundFile:
    """``path`` opened by libsndfile; AudioError saying why not (with how to convert a
    container it does not read)."""
    try:
        return soundfile.SoundFile(str(path))
    except Exception as exc:  # LibsndfileError, or TypeError for headerless RAW
        suffix = path.suffix.lower()
        if suffix in CONVERT_EXTENSIONS:
            flac = shlex.quote(str(path.with_suffix(".flac")))
            reason = (f"{suffix} ({CONVERT_EXTENSIONS[suffix]}) is not a format libsndfile "
                      f"reads; convert it first, e.g. ffmpeg -i {shlex.quote(str(path))} {flac}")
        elif _looks_like_text(head):
            reason = "a text file, not audio"
        elif getattr(exc, "code", None) == 3:  # SF_ERR_MALFORMED_FILE
            reason = f"damaged or truncated: cannot be opened ({_libsndfile_reason(exc)})"
        else:
            reason = f"not an audio file libsndfile can read ({_libsndfile_reason(exc)})"
        raise AudioError(path, reason) from exc


def _check_chunk_sizes(path: Path, sound: soundfile.SoundFile) -> None:
    """AudioError when libsndfile's log says the header promises more audio data than the
    file holds (a WAV/AIFF cut short: libsndfile would silently read what is there); a size
    written by a pipe, where the length was unknown, is not a promise."""
    for said, holds in _CHUNK_SIZE_LOG.findall(sound.extra_info):
        if int(said) > int(holds) and int(said) not in _STREAMING_SIZES:
            raise AudioError(path, f"truncated: its header says {said} bytes of audio, the "
                             f"file holds {holds}")


def check_samples(source: str, mono: np.ndarray, rate: int) -> None:
    """AudioError (naming ``source``) unless ``mono`` (samples,) at ``rate`` has samples, all
    finite."""
    if not len(mono):
        raise AudioError(source, "holds no audio samples")
    finite = np.isfinite(mono)
    if not finite.all():
        first = int(np.argmin(finite))
        raise AudioError(source, f"holds NaN or infinite samples (the first at "
                         f"{first / rate:.3f} s); audio samples must be finite")


def _libsndfile_reason(exc: Exception) -> str:
    reason = getattr(exc, "error_string", "") or str(exc)
    return reason.removeprefix("Error : ").rstrip(".")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


# --------------------------------------------------------------------------- inputs


def _input_names(args: Sequence[str], stdin: TextIO | None) -> Iterable[str]:
    """``args`` with ``-`` replaced by the non-blank lines of ``stdin`` (read once)."""
    read_stdin = False
    for arg in args:
        if arg != "-":
            yield arg
        elif stdin is None:
            raise ValueError("- reads paths from standard input, but there is none")
        elif not read_stdin:
            read_stdin = True
            for line in stdin:
                if (name := line.rstrip("\r\n")).strip():
                    yield name


def _audio_files(folder: Path) -> tuple[list[Path], list[AudioError]]:
    """The audio files under ``folder``, sorted, and the errors of subfolders that cannot be
    listed."""
    suffixes = set(AUDIO_EXTENSIONS) | set(CONVERT_EXTENSIONS)
    found: list[Path] = []
    errors: list[AudioError] = []

    def unlistable(exc: OSError) -> None:
        errors.append(AudioError(exc.filename, f"folder cannot be listed: {exc.strerror}"))

    for root, dirs, files in os.walk(folder, onerror=unlistable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found), errors
