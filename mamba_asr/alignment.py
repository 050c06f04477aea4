"""Word timestamps from CTC posteriors, pause cuts of long posteriors, and boundary errors.

A hypothesis (the words a decoder produced) is turned into CTC targets (:func:`word_targets`)
and aligned to the CTC head's log-probabilities with torchaudio's Viterbi forced alignment
(:func:`align_words`): a word starts at its first token's first frame and ends after its last
token's last frame. Its probability is the geometric mean of the aligned tokens' posteriors
over the frames they occupy: exp of the mean log-probability of those frames (blank frames
inside or around the word are not counted).

Forced alignment costs frames x tokens, so long recordings are cut first in the middle of
pauses, runs of frames whose most likely output is blank (:func:`split_at_blanks`); each range
is decoded and aligned on its own, ``offset_seconds`` keeping the times in the file's time.
Cutting inside a blank run leaves greedy CTC decoding unchanged (no token spans the cut).

:func:`boundary_errors` measures timestamps against reference word times: words are paired by
an edit-distance alignment and only exact matches are compared.

    tokens, spans = word_targets(words, encode_word, separator=3)  # characters, space id 3
    words = align_words(log_probs, words, tokens, spans, blank=0, frame_seconds=0.04)
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchaudio.functional as taf
from speechbrain.utils.edit_distance import EDIT_SYMBOLS, alignment, op_table

from mamba_asr.transcript import Word

__all__ = [
    "BoundaryStats",
    "align_words",
    "boundary_errors",
    "ctc_feasible",
    "split_at_blanks",
    "word_targets",
]

logger = logging.getLogger(__name__)

# How far a row of log_probs may sum away from probability 1 (log-softmax in low precision).
_LOG_NORM_TOLERANCE = 1e-2


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


def _check_frames(log_probs: torch.Tensor) -> None:
    """ValueError unless ``log_probs`` is (frames, vocabulary)."""
    if log_probs.dim() != 2:
        raise ValueError(
            f"log_probs has shape {tuple(log_probs.shape)}; expected (frames, vocabulary)"
        )


def _check_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """``log_probs`` as a float32 CPU tensor (T, V) of log-probabilities; ValueError otherwise."""
    _check_frames(log_probs)
    log_probs = log_probs.detach().to("cpu", torch.float32)
    if log_probs.shape[0]:
        worst = torch.logsumexp(log_probs, dim=-1).abs().max().item()
        if not worst <= _LOG_NORM_TOLERANCE:
            raise ValueError(
                f"log_probs rows are not log-probabilities (a row's logsumexp is {worst:.3g} "
                "from 0); pass the CTC head's log_softmax output"
            )
    return log_probs


def _check_targets(
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


def align_words(
    log_probs: torch.Tensor,
    words: Sequence[str],
    tokens: Sequence[int],
    spans: Sequence[tuple[int, int]],
    blank: int,
    frame_seconds: float,
    offset_seconds: float = 0.0,
) -> list[Word]:
    """Timed words of a hypothesis by CTC forced alignment to ``log_probs`` (T, V).

    ``tokens`` and ``spans`` come from :func:`word_targets`. A word's start is its first
    token's first frame, its end its last token's last frame + 1, both x ``frame_seconds`` +
    ``offset_seconds`` (the segment's start in the file). Its probability is exp of the mean
    log-probability of its tokens' frames on the Viterbi path.

    A hypothesis CTC cannot emit (more tokens, plus one per repeated neighbour, than frames;
    or a token equal to ``blank``, e.g. SentencePiece's unknown piece) is not aligned: its
    words share the segment evenly by token count and get probability 0.0, and a warning says
    so. An empty hypothesis gives [].
    """
    log_probs = _check_log_probs(log_probs)
    frames, vocab = log_probs.shape
    _check_targets(words, tokens, spans, vocab)
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
    targets = torch.tensor([tokens], dtype=torch.int32)
    path, scores = taf.forced_align(log_probs.unsqueeze(0), targets, blank=blank)
    token_spans = taf.merge_tokens(path[0], scores[0], blank=blank)
    # The path visits each target once in order, so the merged spans pair up with ``tokens``.
    assert len(token_spans) == len(tokens), (len(token_spans), len(tokens))
    timed = []
    for word, (start, end) in zip(words, spans, strict=True):
        own = token_spans[start:end]
        n_frames = sum(len(s) for s in own)
        mean_log_prob = sum(s.score * len(s) for s in own) / n_frames
        timed.append(
            Word(
                word=word,
                start=offset_seconds + own[0].start * frame_seconds,
                end=offset_seconds + own[-1].end * frame_seconds,
                probability=math.exp(mean_log_prob),
            )
        )
    return timed


def _blank_runs(is_blank: torch.Tensor) -> list[tuple[int, int]]:
    """The maximal runs [start, end) of True in the 1-D bool tensor ``is_blank``, in order."""
    values, counts = torch.unique_consecutive(is_blank, return_counts=True)
    ends = torch.cumsum(counts, 0)
    return [
        (end - count, end)
        for value, count, end in zip(values.tolist(), counts.tolist(), ends.tolist(), strict=True)
        if value
    ]


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


def split_at_pauses(
    log_probs: torch.Tensor, blank: int, min_blank_frames: int
) -> list[tuple[int, int]]:
    """Consecutive frame ranges [start, end) covering [0, T) of ``log_probs`` (T, V), cut in
    the middle of every pause: a run of at least ``min_blank_frames`` frames whose argmax is
    ``blank``. Decoded apart, no word spans a pause (a character model trained on single
    utterances never emits a space between two of them: decoded whole, the last word of one
    and the first of the next would merge)."""
    _check_frames(log_probs)
    frames = log_probs.shape[0]
    if frames == 0:
        return []
    runs = _blank_runs(log_probs.argmax(dim=-1) == blank)
    cuts = [(a + b) // 2 for a, b in runs if b - a >= min_blank_frames and 0 < a and b < frames]
    bounds = [0, *cuts, frames]
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def split_at_blanks(
    log_probs: torch.Tensor, blank: int, min_blank_frames: int, max_frames: int
) -> list[tuple[int, int]]:
    """Consecutive frame ranges [start, end) covering [0, T) of ``log_probs`` (T, V), each at
    most ``max_frames`` long, cut in pauses.

    A recording of at most ``max_frames`` frames is one range. Longer ones are cut from the
    start: each range ends in the middle of the last pause (a run of at least
    ``min_blank_frames`` frames whose argmax is ``blank``) that keeps it within
    ``max_frames``; without one, in the middle of the longest shorter blank run there; without
    any blank frame, at ``max_frames`` (the only cut that can split a token). T = 0 gives [].
    """
    _check_frames(log_probs)
    if max_frames < 1 or min_blank_frames < 1:
        raise ValueError(
            f"max_frames ({max_frames}) and min_blank_frames ({min_blank_frames}) must be >= 1"
        )
    total = log_probs.shape[0]
    runs = _blank_runs(log_probs.argmax(dim=-1).cpu() == blank)
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


@dataclass(frozen=True)
class BoundaryStats:
    """Word-boundary errors of timed hypotheses against reference times, in seconds.

    Sums are kept so that the stats of many utterances add up (``a + b``, ``sum(stats,
    BoundaryStats())``) to word-weighted means over all of them. The means are nan when no
    word matched.
    """

    matched: int = 0  # words compared: equal in reference and hypothesis, paired
    reference_words: int = 0
    hypothesis_words: int = 0
    start_error_sum: float = 0.0  # sum of |hypothesis start - reference start|
    end_error_sum: float = 0.0

    @property
    def start_error(self) -> float:
        """Mean absolute start error of the matched words."""
        return self.start_error_sum / self.matched if self.matched else math.nan

    @property
    def end_error(self) -> float:
        """Mean absolute end error of the matched words."""
        return self.end_error_sum / self.matched if self.matched else math.nan

    @property
    def boundary_error(self) -> float:
        """Mean absolute error of all matched boundaries, starts and ends together."""
        both = self.start_error_sum + self.end_error_sum
        return both / (2 * self.matched) if self.matched else math.nan

    def __add__(self, other: BoundaryStats) -> BoundaryStats:
        return BoundaryStats(
            self.matched + other.matched,
            self.reference_words + other.reference_words,
            self.hypothesis_words + other.hypothesis_words,
            self.start_error_sum + other.start_error_sum,
            self.end_error_sum + other.end_error_sum,
        )


def boundary_errors(
    reference: Sequence[tuple[str, float, float]], hypothesis: Sequence[Word]
) -> BoundaryStats:
    """Boundary errors of ``hypothesis`` against ``reference`` (word, start, end) of one
    utterance. Words are paired by SpeechBrain's edit-distance alignment; substituted,
    inserted and deleted words are counted but not compared."""
    ops = alignment(op_table([r[0] for r in reference], [w.word for w in hypothesis]))
    pairs = [(reference[i], hypothesis[j]) for op, i, j in ops if op == EDIT_SYMBOLS["eq"]]
    return BoundaryStats(
        matched=len(pairs),
        reference_words=len(reference),
        hypothesis_words=len(hypothesis),
        start_error_sum=sum(abs(h.start - r[1]) for r, h in pairs),
        end_error_sum=sum(abs(h.end - r[2]) for r, h in pairs),
    )
