"""CTC word timing without a tensor library: targets of a hypothesis, word times from aligned
token spans, and pause cuts of long posteriors (NumPy and pure Python).

Shared by :mod:`mamba_asr.alignment` (torch, torchaudio's forced alignment) and the
PyTorch-free runtime :mod:`mamba_asr.ort`, so that both give the same words from the same
alignment.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

from mamba_asr.transcript import Word

logger = logging.getLogger("mamba_asr.alignment")

# How far a row of log_probs may sum away from probability 1 (log-softmax in low precision).
LOG_NORM_TOLERANCE = 1e-2
# An aligner: the CTC targets -> their merged spans (first frame, end frame, mean log-prob)
Aligner = Callable[[list[int]], list[tuple[int, int, float]]]


def word_targets(
    words: Sequence[str], encode_word: Callable[[str], list[int]], separator: int | None
) -> tuple[list[int], list[tuple[int, int]]]:
    """The CTC target sequence of ``words`` and each word's token span [start, end) in it.

    Character models pass the id of the space token as ``separator``: the model emits it
    between words, so it is placed between the words' tokens and belongs to no word.
    SentencePiece models pass ``separator=None`` and an ``encode_word`` that encodes one word
    with its word-start piece (``sp.encode_as_ids`` adds the leading "▁" to each word).
    Raises ValueError for a word that encodes to no tokens.
    """
    tokens: list[int] = []
    spans: list[tuple[int, int]] = []
    for i, word in enumerate(words):
        ids = [int(t) for t in encode_word(word)]
        if not ids:
            raise ValueError(f"word {i} {word!r} encodes to no tokens; expected at least one")
        if i and separator is not None:
            tokens.append(separator)
        spans.append((len(tokens), len(tokens) + len(ids)))
        tokens.extend(ids)
    return tokens, spans


def check_targets(
    words: Sequence[str], tokens: Sequence[int], spans: Sequence[tuple[int, int]], vocab: int
) -> None:
    """ValueError unless ``spans`` are ordered, disjoint, non-empty spans of ``tokens``, one per
    word, and every token is an output index of the model."""
    if len(spans) != len(words):
        raise ValueError(f"{len(spans)} token spans for {len(words)} words; expected one per word")
    previous_end = 0
    for i, (start, end) in enumerate(spans):
        if not previous_end <= start < end <= len(tokens):
            raise ValueError(
                f"span {i} ({start}, {end}) of word {words[i]!r} is not a non-empty span of the "
                f"{len(tokens)} tokens after the previous word's (ending at {previous_end})"
            )
        previous_end = end
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the model's {vocab} outputs")


def ctc_feasible(tokens: Sequence[int], frames: int, blank: int) -> bool:
    """Whether CTC can emit ``tokens`` in ``frames`` frames: no token is the blank, and there is
    a frame per token plus a blank frame between each pair of equal neighbours."""
    repeats = sum(a == b for a, b in itertools.pairwise(tokens))
    return blank not in tokens and len(tokens) + repeats <= frames


def _spread_words(
    words: Sequence[str],
    n_tokens: int,
    spans: Sequence[tuple[int, int]],
    seconds: float,
    offset_seconds: float,
) -> list[Word]:
    """Times for a hypothesis CTC cannot emit: the segment shared evenly among the tokens, each
    word covering its tokens' share; probability 0 (CTC gives the hypothesis probability 0)."""
    per_token = seconds / n_tokens
    return [
        Word(
            word=word,
            start=offset_seconds + start * per_token,
            end=offset_seconds + end * per_token,
            probability=0.0,
        )
        for word, (start, end) in zip(words, spans, strict=True)
    ]


def _blank_runs(is_blank: np.ndarray) -> list[tuple[int, int]]:
    """The maximal runs [start, end) of True in the 1-D bool array ``is_blank``, in order."""
    edges = np.diff(np.concatenate(([0], np.asarray(is_blank, dtype=np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(),
                    strict=True))


def _cut_point(
    runs: list[tuple[int, int]], starts: list[int], lo: int, hi: int, min_blank_frames: int
) -> int:
    """Where to end the range starting at ``lo`` that may reach ``hi``: the middle of the last
    blank run of at least ``min_blank_frames`` inside (lo, hi), else of the longest blank run
    there, else ``hi``. ``starts`` are the runs' starts. Runs are clipped to the window; one
    that holds ``lo`` (the rest of the pause cut before) is not used."""
    window = runs[bisect.bisect_right(starts, lo) : bisect.bisect_left(starts, hi)]
    inside = [(a, min(b, hi)) for a, b in window]
    long = [r for r in inside if r[1] - r[0] >= min_blank_frames]
    if long:
        a, b = long[-1]
    elif inside:
        a, b = max(inside, key=lambda r: r[1] - r[0])
    else:
        return hi
    return (a + b) // 2


def check_log_probs(log_probs: np.ndarray) -> None:
    """ValueError unless ``log_probs`` (T, V) holds rows of log-probabilities."""
    if log_probs.ndim != 2:
        raise ValueError(
            f"log_probs has shape {tuple(log_probs.shape)}; expected (frames, vocabulary)"
        )
    if log_probs.shape[0]:
        top = log_probs.max(axis=-1, keepdims=True)
        sums = top[:, 0] + np.log(np.exp(log_probs - top).sum(axis=-1))
        worst = float(np.abs(sums).max())
        if not worst <= LOG_NORM_TOLERANCE:
            raise ValueError(
                f"log_probs rows are not log-probabilities (a row's logsumexp is {worst:.3g} "
                "from 0); pass the CTC head's log_softmax output"
            )


def timed_words(
    words: Sequence[str],
    tokens: Sequence[int],
    spans: Sequence[tuple[int, int]],
    shape: tuple[int, int],
    blank: int,
    frame_seconds: float,
    offset_seconds: float,
    align: Aligner,
) -> list[Word]:
    """Timed words of a hypothesis (see :func:`mamba_asr.alignment.align_words`) on
    log-probabilities of ``shape`` (frames, vocabulary): ``align`` maps the targets to one
    (start, end, mean log-prob) span per token."""
    frames, vocab = shape
    check_targets(words, tokens, spans, vocab)
    if not words:
        return []
    if not ctc_feasible(tokens, frames, blank):
        logger.warning(
            "%d tokens (%d words) cannot be aligned to %d frames; their times are spread "
            "evenly over the segment, probability 0",
            len(tokens),
            len(words),
            frames,
        )
        return _spread_words(words, len(tokens), spans, frames * frame_seconds, offset_seconds)
    token_spans = align(list(tokens))
    # The path visits each target once in order, so the merged spans pair up with ``tokens``.
    assert len(token_spans) == len(tokens), (len(token_spans), len(tokens))
    timed = []
    for word, (start, end) in zip(words, spans, strict=True):
        own = token_spans[start:end]
        n_frames = sum(b - a for a, b, _ in own)
        mean_log_prob = sum(score * (b - a) for a, b, score in own) / n_frames
        timed.append(
            Word(
                word=word,
                start=offset_seconds + own[0][0] * frame_seconds,
                end=offset_seconds + own[-1][1] * frame_seconds,
                probability=math.exp(mean_log_prob),
            )
        )
    return timed


def split_at_pauses(is_blank: np.ndarray, min_blank_frames: int) -> list[tuple[int, int]]:
    """Frame ranges covering ``is_blank`` (T,) (each frame: is its argmax the blank?), cut in
    the middle of every run of at least ``min_blank_frames`` blank frames inside it."""
    frames = len(is_blank)
    if frames == 0:
        return []
    runs = _blank_runs(is_blank)
    cuts = [(a + b) // 2 for a, b in runs if b - a >= min_blank_frames and 0 < a and b < frames]
    bounds = [0, *cuts, frames]
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def split_at_blanks(
    is_blank: np.ndarray, min_blank_frames: int, max_frames: int
) -> list[tuple[int, int]]:
    """Frame ranges covering ``is_blank`` (T,), each at most ``max_frames`` long, cut in
    pauses (see :func:`mamba_asr.alignment.split_at_blanks`)."""
    if max_frames < 1 or min_blank_frames < 1:
        raise ValueError(
            f"max_frames ({max_frames}) and min_blank_frames ({min_blank_frames}) must be >= 1"
        )
    total = len(is_blank)
    runs = _blank_runs(is_blank)
    starts = [a for a, _ in runs]
    ranges = []
    start = 0
    while total - start > max_frames:
        end = _cut_point(runs, starts, start, start + max_frames, min_blank_frames)
        ranges.append((start, end))
        start = end
    if total > start:
        ranges.append((start, total))
    return ranges
