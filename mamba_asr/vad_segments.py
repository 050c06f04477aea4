"""From Silero VAD's per-frame speech probabilities to segments of at most a given length, in
NumPy: shared by :mod:`mamba_asr.vad` (the TorchScript model) and :mod:`mamba_asr.ort.vad`
(its ONNX file), which differ only in how they get the probabilities."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

VAD_RATES = (8000, 16000)  # the rates Silero VAD runs at; others are resampled to 16 kHz
PAD_MS = 200  # speech padding kept on both sides of a segment (less where two segments meet)
MIN_SILENCE_MS = 300  # a pause this long ends a segment; shorter ones stay inside it
PAUSE_FRAMES = 5  # over-long segments are cut where the probability averaged over 160 ms is lowest


def check_options(sample_rate: object, max_seconds: object) -> None:
    """ValueError unless ``sample_rate`` is a positive int and ``max_seconds`` a positive,
    finite number."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(
            f"speech_segments: sample_rate must be a positive int, got {sample_rate!r}"
        )
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) \
            or not 0 < max_seconds < math.inf:
        raise ValueError(
            f"speech_segments: max_seconds must be a positive number of seconds, "
            f"got {max_seconds!r}"
        )


def vad_rate(sample_rate: int) -> tuple[int, int]:
    """The rate Silero VAD runs at for audio at ``sample_rate``, and its frame in samples."""
    rate = sample_rate if sample_rate in VAD_RATES else 16000
    return rate, 512 if rate == 16000 else 256


def pause_scores(probs: np.ndarray) -> np.ndarray:
    """Each frame's speech probability averaged over the ``PAUSE_FRAMES`` frames centred on it
    (fewer at the edges), as float32 (frames,)."""
    probs = np.asarray(probs, dtype=np.float32)
    kernel = np.ones(PAUSE_FRAMES, dtype=np.float32)
    sums = np.convolve(probs, kernel, mode="same")
    counts = np.convolve(np.ones_like(probs), kernel, mode="same")
    return (sums / counts).astype(np.float32)


def speech_regions(
    probs: np.ndarray, sample_rate: int, n_samples: int, threshold: float, min_silence_ms: int,
    pad_ms: int, min_speech_ms: int = 250,
) -> list[dict[str, int]]:
    """Silero VAD's rules (its ``get_speech_timestamps_from_probs`` without a length limit):
    the speech regions (``start``/``end`` samples) of ``n_samples`` samples at ``sample_rate``
    (8 or 16 kHz) from their frames' speech ``probs``.

    Speech starts at a frame of probability >= ``threshold`` and ends where the probability
    stays below ``threshold`` - 0.15 for ``min_silence_ms``; a region of at most
    ``min_speech_ms`` is dropped; regions get ``pad_ms`` on both sides, or half the gap where
    two are closer than twice that."""
    _, window = vad_rate(sample_rate)
    min_speech = sample_rate * min_speech_ms / 1000
    min_silence = sample_rate * min_silence_ms / 1000
    pad = sample_rate * pad_ms / 1000
    quiet = max(threshold - 0.15, 0.01)
    regions: list[dict[str, int]] = []
    start: int | None = None  # the open region's first sample
    silent_since = 0  # where the open region's current silence began (0: none)
    for frame, prob in enumerate(np.asarray(probs, dtype=np.float64).tolist()):
        sample = window * frame
        if prob >= threshold:
            silent_since = 0
            if start is None:
                start = sample
            continue
        if start is None or prob >= quiet:
            continue
        silent_since = silent_since or sample
        if sample - silent_since >= min_silence:
            if silent_since - start > min_speech:
                regions.append({"start": start, "end": silent_since})
            start, silent_since = None, 0
    if start is not None and n_samples - start > min_speech:
        regions.append({"start": start, "end": n_samples})
    for i, region in enumerate(regions):
        if i == 0:
            region["start"] = int(max(0, region["start"] - pad))
        if i + 1 < len(regions):
            following = regions[i + 1]
            gap = following["start"] - region["end"]
            share = gap // 2 if gap < 2 * pad else pad
            region["end"] = int(min(n_samples, region["end"] + share))
            following["start"] = int(max(0, following["start"] - share))
        else:
            region["end"] = int(min(n_samples, region["end"] + pad))
    return regions


def segments(
    regions: Iterable[Mapping[str, int]],
    pause: np.ndarray,
    n_samples: int,
    sample_rate: int,
    max_seconds: float,
    threshold: float,
) -> list[tuple[int, int]]:
    """The speech ``regions`` (``start``/``end`` in samples at the VAD's rate) as sample ranges
    of the audio at ``sample_rate`` (``n_samples`` long), each cut to at most ``max_seconds``
    at the frames of lowest ``pause`` score (:func:`pause_scores`)."""
    rate, window = vad_rate(sample_rate)
    hop = window * sample_rate / rate  # file samples per VAD frame
    longest = max(1, int(max_seconds * sample_rate))
    out = []
    for region in regions:
        start = min(round(region["start"] * sample_rate / rate), n_samples)
        end = min(round(region["end"] * sample_rate / rate), n_samples)
        if end > start:
            out += _split(start, end, longest, pause, hop, threshold)
    return out


def _split(
    start: int, end: int, longest: int, pause: np.ndarray, hop: float, threshold: float
) -> list[tuple[int, int]]:
    """``[start, end)`` in pieces of at most ``longest`` samples, each cut at the frame of lowest
    ``pause`` score (frames of ``hop`` samples) that leaves the rest splittable, or at
    ``longest`` where no frame there scores below ``threshold``."""
    pieces = []
    while end - start > longest:
        needed = -(-(end - start) // longest)  # pieces still to make, at least
        lo = max(start + 1, end - (needed - 1) * longest)  # the rest fits in needed - 1
        hi = start + longest
        first = math.ceil(lo / hop - 0.5)
        last = min(math.floor(hi / hop - 0.5), len(pause) - 1)
        cut = hi
        if first <= last:
            frame = first + int(np.argmin(pause[first:last + 1]))
            if pause[frame] < threshold:
                cut = min(max(round((frame + 0.5) * hop), lo), hi)
        pieces.append((start, cut))
        start = cut
    return [*pieces, (start, end)]
