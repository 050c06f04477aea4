"""How a transcriber schedules its work, whatever runs the model: files loaded and length-sorted
in groups, short ones in padded batches, long ones in one pass or in voice-activity segments,
CTC posteriors decoded and aligned stretch by stretch between pauses, words put in order.

Shared by :class:`mamba_asr.transcriber.Transcriber` (PyTorch) and
:class:`mamba_asr.ort.transcriber.OnnxTranscriber` (onnxruntime); neither this module nor its
imports need torch. A waveform is anything of ``len`` that slices: a 1-D tensor or array.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mamba_asr import audio_files, ctc_words
from mamba_asr.transcript import Transcript, Word

SEARCHES = ("default", "greedy", "beam")
# A pause in the CTC posteriors: this long a run of blanks ends a stretch decoded alone (no word
# spans it). Words inside an utterance are at most ~0.15 s apart (the demo corpus: 0.13 s),
# utterances put end to end ~0.27 s (their own silences).
PAUSE_SECONDS = 0.2
# Stretches between pauses are decoded and aligned separately up to this length.
STRETCH_SECONDS = 30.0
# Attention models (Conformer encoders, attention decoders) see VAD segments this long at most.
SEGMENT_SECONDS = 30.0
# One-pass limit of ConMamba CTC models: peak memory grows linearly, 3.3 GB for an hour at
# ConMamba-S sizes (docs/performance.md); longer files are cut into VAD segments this long.
MAX_PASS_SECONDS = 3600.0
BATCH_FILE_SECONDS = 60.0
MIN_BATCH_SECONDS = 0.1
MAX_BATCH_SECONDS = 120.0
_PREFETCH = 64  # files loaded and length-sorted together


@dataclass
class Piece:
    """A stretch of one input's audio transcribed as an utterance."""

    index: int  # the input's position
    wav: Any  # (samples,)
    offset: float  # seconds from the file's start


class BatchingTranscriber:
    """The scheduling of :mod:`mamba_asr.transcriber`'s module docstring; a subclass sets
    ``sample_rate``, ``frame_seconds``, ``blank``, ``one_pass``, ``max_pass_seconds``,
    ``segment_seconds``, ``max_batch_seconds``, ``_special_labels``, its ``audio`` and ``vad``
    modules, and runs the model."""

    # modules of the subclass's array type: ``load_audio(path, rate)`` and
    # ``prepare_waveform(array, sr, rate)``; ``speech_segments(wav, rate, max_seconds)``
    audio: Any
    vad: Any

    sample_rate: int
    frame_seconds: float
    blank: int
    one_pass: bool
    max_pass_seconds: float
    segment_seconds: float
    max_batch_seconds: float
    _special_labels: Sequence[str] = ()

    @property
    def batch_file_seconds(self) -> float:
        return min(BATCH_FILE_SECONDS, self.segment_seconds)

    # ------------------------------------------------------------------ to implement

    def _transcribe_batch(self, batch: list[Piece]) -> list[list[Word]]:
        """Words (in file time) of each piece, padded into one batch."""
        raise NotImplementedError

    def _one_pass(self, wav: Any, offset: float) -> list[Word]:
        """Words of a long piece run through the model whole (CTC models)."""
        raise NotImplementedError

    def _decode(self, log_probs: Any) -> str:
        """The CTC hypothesis of one stretch of log-probabilities (T, V)."""
        raise NotImplementedError

    def _align(self, log_probs: Any, words: list[str], offset: float) -> list[Word]:
        """Word times of ``words`` on the CTC log-probabilities (T, V) of their audio."""
        raise NotImplementedError

    def _is_blank(self, log_probs: Any) -> np.ndarray:
        """(T,) bool: whether each frame's most likely output is the blank."""
        raise NotImplementedError

    # ------------------------------------------------------------------ transcription

    def _load(self, item: Any) -> tuple[Any, str]:
        """A file or (waveform, sample rate) as mono audio at ``sample_rate``, and its name."""
        if isinstance(item, tuple):
            wav, rate = item
            return self.audio.prepare_waveform(wav, rate, self.sample_rate), "<waveform>"
        return self.audio.load_audio(item, self.sample_rate), str(item)

    def _segments(self, wav: Any) -> list[tuple[int, int]]:
        """Voice-activity segments of at most ``segment_seconds`` (sample ranges)."""
        return self.vad.speech_segments(wav, self.sample_rate, self.segment_seconds)

    def transcribe(
        self,
        inputs: Iterable[Any],
        on_error: Callable[[Any, Exception], None] | None = None,
    ) -> Iterator[Transcript]:
        """Transcripts of ``inputs`` (files, or ``(waveform, sample_rate)``), in input order.
        A file that cannot be read raises ``AudioError``, or, with ``on_error``, is reported
        to it and skipped."""
        group: list[Any] = []
        for item in inputs:
            group.append(item)
            if len(group) == _PREFETCH:
                yield from self._transcribe_group(group, on_error)
                group = []
        if group:
            yield from self._transcribe_group(group, on_error)

    def transcribe_file(self, path: str | Path) -> Transcript:
        """The transcript of one file."""
        return next(iter(self.transcribe([path])))

    def _transcribe_group(
        self, group: list[Any], on_error: Callable[[Any, Exception], None] | None
    ) -> Iterator[Transcript]:
        loaded: dict[int, tuple[Any, str, float]] = {}
        for i, item in enumerate(group):
            start = time.perf_counter()
            try:
                wav, name = self._load(item)
            except audio_files.AudioError as exc:
                if on_error is None:
                    raise
                on_error(item, exc)
                continue
            loaded[i] = (wav, name, time.perf_counter() - start)
        words: dict[int, list[Word]] = {i: [] for i in loaded}
        spent: dict[int, float] = dict.fromkeys(loaded, 0.0)
        pieces: list[Piece] = []
        for i, (wav, _, _) in loaded.items():
            seconds = len(wav) / self.sample_rate
            if seconds <= self.batch_file_seconds or (
                self.one_pass and seconds <= self.max_pass_seconds
            ):
                pieces.append(Piece(i, wav, 0.0))
            else:
                pieces += [Piece(i, wav[a:b], a / self.sample_rate)
                           for a, b in self._segments(wav)]
        short = []
        for piece in pieces:
            if len(piece.wav) <= self.batch_file_seconds * self.sample_rate:
                short.append(piece)
                continue
            start = time.perf_counter()  # a ConMamba CTC model: the whole piece in one pass
            words[piece.index] += self._one_pass(piece.wav, piece.offset)
            spent[piece.index] += time.perf_counter() - start
        for batch in self._batches(short):
            start = time.perf_counter()
            results = self._transcribe_batch(batch)
            share = (time.perf_counter() - start) / sum(len(p.wav) for p in batch)
            for piece, piece_words in zip(batch, results, strict=True):
                words[piece.index] += piece_words
                spent[piece.index] += share * len(piece.wav)
        for i, (wav, name, load_s) in loaded.items():
            duration = len(wav) / self.sample_rate
            file_words = in_order(sorted(words[i], key=lambda w: w.start), duration)
            yield Transcript(
                text=" ".join(w.word for w in file_words),
                duration=duration,
                words=file_words,
                source=name,
                timings={"load": load_s, "transcribe": spent[i],
                         "real_time_factor": (load_s + spent[i]) / duration if duration else 0.0},
            )

    def _batches(self, pieces: list[Piece]) -> Iterator[list[Piece]]:
        """Length-sorted batches of at most ``max_batch_seconds`` of padded audio."""
        pieces = sorted(pieces, key=lambda p: len(p.wav))
        batch: list[Piece] = []
        for piece in pieces:
            padded = len(piece.wav) * (len(batch) + 1) / self.sample_rate
            if batch and padded > self.max_batch_seconds:
                yield batch
                batch = []
            batch.append(piece)
        if batch:
            yield batch

    def _batch_width(self, lengths: Sequence[int]) -> int:
        """Samples of a padded batch: the longest piece, at least ``MIN_BATCH_SECONDS`` (the
        front-end's convolutions need a few frames, so a clip of a few ms is padded as it
        would be beside a longer one in a batch)."""
        return max(int(max(lengths)), round(MIN_BATCH_SECONDS * self.sample_rate))

    def _ctc_words(self, log_probs: Any, offset: float) -> list[Word]:
        """Decode and align CTC log-probabilities (T, V) stretch by stretch between pauses
        (at most ``STRETCH_SECONDS`` each)."""
        pause = max(1, round(PAUSE_SECONDS / self.frame_seconds))
        longest = max(pause + 1, round(STRETCH_SECONDS / self.frame_seconds))
        is_blank = self._is_blank(log_probs)
        words: list[Word] = []
        stretches = [
            (lo + a, lo + b)
            for lo, hi in ctc_words.split_at_pauses(is_blank, pause)
            for a, b in ctc_words.split_at_blanks(is_blank[lo:hi], pause, longest)
        ]
        for a, b in stretches:
            part = log_probs[a:b]
            text = self._decode(part)
            for label in self._special_labels:  # <bos>/<eos>: never targets, not words
                text = text.replace(label, " ")
            words += self._align(part, text.split(), offset + a * self.frame_seconds)
        return words


def in_order(words: list[Word], duration: float) -> list[Word]:
    """``words`` (sorted by start) with times inside [0, duration] that never overlap: a
    word's last 40 ms frame may run past the audio's end, or past the start of the next
    segment's first word where voice-activity segments touch."""
    out: list[Word] = []
    for w in words:
        start = min(max(w.start, out[-1].end if out else 0.0), duration)
        out.append(replace(w, start=start, end=min(max(w.end, start), duration)))
    return out
