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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.functional as taf
from speechbrain.utils.edit_distance import EDIT_SYMBOLS, alignment, op_table

from mamba_asr import ctc_words
from mamba_asr.ctc_words import ctc_feasible, word_targets
from mamba_asr.transcript import Word

__all__ = [
    "BoundaryStats",
    "align_words",
    "boundary_errors",
    "ctc_feasible",
    "split_at_blanks",
    "word_targets",
]



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
    ctc_words.check_log_probs(log_probs.numpy())
    return log_probs


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

    def align(targets: list[int]) -> list[tuple[int, int, float]]:
        path, scores = taf.forced_align(
            log_probs.unsqueeze(0), torch.tensor([targets], dtype=torch.int32), blank=blank
        )
        return [(s.start, s.end, s.score)
                for s in taf.merge_tokens(path[0], scores[0], blank=blank)]

    return ctc_words.timed_words(words, tokens, spans, tuple(log_probs.shape), blank,
                                 frame_seconds, offset_seconds, align)


def split_at_pauses(
    log_probs: torch.Tensor, blank: int, min_blank_frames: int
) -> list[tuple[int, int]]:
    """Consecutive frame ranges [start, end) covering [0, T) of ``log_probs`` (T, V), cut in
    the middle of every pause: a run of at least ``min_blank_frames`` frames whose argmax is
    ``blank``. Decoded apart, no word spans a pause (a character model trained on single
    utterances never emits a space between two of them: decoded whole, the last word of one
    and the first of the next would merge)."""
    _check_frames(log_probs)
    return ctc_words.split_at_pauses(_is_blank(log_probs, blank), min_blank_frames)


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
    return ctc_words.split_at_blanks(_is_blank(log_probs, blank), min_blank_frames, max_frames)


def _is_blank(log_probs: torch.Tensor, blank: int) -> np.ndarray:
    """(T,) bool: whether each frame's most likely output is ``blank``."""
    return (log_probs.argmax(dim=-1) == blank).cpu().numpy()


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
