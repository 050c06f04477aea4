"""CTC decoding and forced alignment in NumPy: greedy decoding, prefix beam search and Viterbi
alignment of CTC log-probabilities (T, V), giving the results of SpeechBrain's
``ctc_greedy_decode`` / ``CTCPrefixBeamSearcher`` (without LM) and of torchaudio's
``forced_align`` + ``merge_tokens`` on the same input, without either library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mamba_asr import ctc_words
from mamba_asr.transcript import Word

SPM_WORD_START = "▁"  # SentencePiece's word-start mark (U+2581)


def greedy_decode(log_probs: np.ndarray, blank: int) -> list[int]:
    """The token ids of the best path of ``log_probs`` (T, V): repeats merged, blanks dropped."""
    best = np.asarray(log_probs).argmax(axis=-1)
    if not len(best):
        return []
    keep = np.concatenate(([True], best[1:] != best[:-1])) & (best != blank)
    return best[keep].tolist()


@dataclass
class _Beam:
    """One prefix of the search: its text, how it ended, and its scores (log domain)."""

    text: str
    partial_word: str  # the word being spelled (for prune_history)
    last_token: str | None
    last_index: int | None
    p_b: float = -math.inf  # ends in a blank
    p_nb: float = -math.inf  # ends in a token
    next_b: float = -math.inf  # this frame's sums, made current by step()
    next_nb: float = -math.inf
    score: float = -math.inf  # logaddexp(p_b, p_nb)

    def step(self) -> None:
        self.p_b, self.p_nb = self.next_b, self.next_nb
        self.next_b = self.next_nb = -math.inf
        # kept a NumPy float64, the sums' precision as in SpeechBrain (a Python float plus a
        # float32 log-prob is float32, NumPy's float64 plus one is float64)
        self.score = np.logaddexp(self.p_b, self.p_nb)


class PrefixBeamSearch:
    """CTC prefix beam search over labels ``vocab`` (index -> label; the space label of a
    character model is ``space``), the rules and pruning of SpeechBrain's
    ``CTCPrefixBeamSearcher`` without a language model: at each frame the tokens above
    ``token_prune_min_logp`` (and the best) extend the prefixes, prefixes are kept within
    ``beam_prune_logp`` of the best, at most ``beam_size`` of them; ``prune_history`` keeps one
    prefix per (last word, word being spelled, last token).

    ``search(log_probs)`` gives the best prefix's text (words separated by single spaces).
    """

    def __init__(
        self,
        vocab: Sequence[str],
        blank: int,
        beam_size: int = 100,
        beam_prune_logp: float = -10.0,
        token_prune_min_logp: float = -5.0,
        prune_history: bool = True,
        space: str = " ",
    ) -> None:
        self.vocab = list(vocab)
        self.blank = blank
        self.beam_size = beam_size
        self.beam_prune_logp = beam_prune_logp
        self.token_prune_min_logp = token_prune_min_logp
        self.prune_history = prune_history
        self.is_spm = any(str(label).startswith(SPM_WORD_START) for label in self.vocab)
        self.space_index = self.vocab.index(space) if space in self.vocab else -1

    def search(self, log_probs: np.ndarray) -> str:
        """The text of the best prefix for ``log_probs`` (T, V)."""
        beams = [_Beam("", "", None, None, p_b=0.0, score=0.0)]
        known = set(range(len(self.vocab)))
        for column in np.asarray(log_probs, dtype=np.float32):
            # the token set is built as SpeechBrain builds it: its iteration order decides
            # the order in which new prefixes appear, and so ties
            candidates = (set(np.where(column > self.token_prune_min_logp)[0])
                          | {column.argmax()}) & known
            current = list(beams)
            by_text: dict[str, _Beam] = {}
            for b in beams:  # the first prefix of a text is the one extended
                by_text.setdefault(b.text, b)
            for index in candidates:
                self._extend(current, beams, by_text, int(index), column[index])
            for beam in beams:
                beam.step()
            beams = self._prune(beams)
        return " ".join(self._best(beams).split())

    def _extend(self, current: list[_Beam], beams: list[_Beam], by_text: dict[str, _Beam],
                index: int, p: np.float32) -> None:
        """Every prefix of ``current`` followed by token ``index`` (log-prob ``p``)."""
        token = self.vocab[index]
        for beam in current:
            if index == self.blank:
                beam.next_b = float(np.logaddexp(beam.next_b, beam.score + p))
                continue
            if token == beam.last_token:  # the token repeated: the same prefix
                beam.next_nb = float(np.logaddexp(beam.next_nb, beam.p_nb + p))
            lookup = beam.text + token
            new = by_text.get(lookup)
            if new is None:
                new = self._new_beam(beam, lookup, token, index)
                beams.append(new)
                by_text.setdefault(new.text, new)
            total = new.next_nb
            if index == beam.last_index and beam.p_b > -math.inf:
                total = np.logaddexp(total, beam.p_b + p)
            elif index != beam.last_index:
                total = np.logaddexp(total, beam.score + p)
            new.next_nb = float(total)

    def _new_beam(self, beam: _Beam, text: str, token: str, index: int) -> _Beam:
        if not self.is_spm and index == self.space_index:
            return _Beam(text, "", token, index)
        if self.is_spm and token[:1] == SPM_WORD_START:
            return _Beam(beam.text + " " + token[1:], token[1:], token, index)
        if index == beam.last_index:
            return _Beam(text, beam.partial_word, token, index)
        return _Beam(text, beam.partial_word + token, token, index)

    def _prune(self, beams: list[_Beam]) -> list[_Beam]:
        best = max(b.score for b in beams)
        kept = [b for b in beams if b.score >= best + self.beam_prune_logp]
        kept = sorted(kept, key=lambda b: b.score, reverse=True)[: self.beam_size]
        if self.prune_history:
            seen: set[tuple] = set()
            unique = []
            for b in kept:
                key = (tuple(b.text.split()[-1:]), b.partial_word, b.last_token)
                if key not in seen:
                    seen.add(key)
                    unique.append(b)
            kept = unique
        return [_Beam(b.text, b.partial_word, b.last_token, b.last_index, b.p_b, b.p_nb,
                      score=b.score) for b in kept]

    def _best(self, beams: list[_Beam]) -> str:
        """The best final text: prefixes that end alike (the same text and word being spelled:
        SentencePiece prefixes) add up, the later one's text kept in the first one's place."""
        final: dict[str, tuple[str, float]] = {}
        for b in beams:
            key = " ".join(part for part in (b.text, b.partial_word) if part)
            if key in final:
                final[key] = (b.text, np.logaddexp(final[key][1], b.score))
            else:
                final[key] = (b.text, b.score)
        return max(final.values(), key=lambda entry: entry[1])[0]


def forced_align(log_probs: np.ndarray, targets: Sequence[int], blank: int) -> np.ndarray:
    """The Viterbi path (T,) of label ids (``blank`` or a target) of ``targets`` through
    ``log_probs`` (T, V): torchaudio's ``forced_align`` (the pinned version) step for step,
    float32 sums, its state window and its choice among tied predecessors. The caller checks
    feasibility (``ctc_words.ctc_feasible``)."""
    log_probs = np.asarray(log_probs, dtype=np.float32)
    frames = log_probs.shape[0]
    labels = np.full(2 * len(targets) + 1, blank, dtype=np.int64)
    labels[1::2] = targets
    states = len(labels)
    # a token state may be entered from two states back: not a blank, nor a repeated token
    skip = np.zeros(states, dtype=bool)
    skip[3::2] = labels[3::2] != labels[1:-2:2]
    emit = log_probs[:, labels]  # (T, S)
    n_targets = len(targets)
    repeats = int(np.sum(labels[3::2] == labels[1:-2:2]))
    # torchaudio only scores the states that can still be on a complete path: a window
    # [start, end) that closes in from both sides; the same window gives the same ties
    start = 0 if frames - (n_targets + repeats) > 0 else 1
    end = 1 if states == 1 else 2
    alpha = np.full(states, -np.inf, dtype=np.float32)
    alpha[start:end] = emit[0, start:end]
    back = np.zeros((frames, states), dtype=np.int8)
    for t in range(1, frames):
        if frames - t <= n_targets + repeats:
            if start % 2 == 1 and start + 2 < states and labels[start] != labels[start + 2]:
                start += 1
            start += 1
        if t <= n_targets + repeats:
            if end % 2 == 0 and end < 2 * n_targets and labels[end - 1] != labels[end + 1]:
                end += 1
            end += 1
        stay = alpha
        step = np.concatenate(([-np.inf], alpha[:-1])).astype(np.float32)
        jump = np.where(skip, np.concatenate(([-np.inf, -np.inf], alpha[:-2])), -np.inf)
        # torchaudio's choice, kept for identical alignments: a step needs to beat both
        # others, so where step and jump tie above stay, stay wins (pytorch/audio issue 4221)
        take_jump = (jump > step) & (jump > stay)
        take_step = ~take_jump & (step > stay) & (step > jump)
        back[t] = np.where(take_jump, 2, np.where(take_step, 1, 0))
        alpha = (np.where(take_jump, jump, np.where(take_step, step, stay)).astype(np.float32)
                 + emit[t])
        alpha[:start] = -np.inf
        alpha[end:] = -np.inf
    state = states - 1 if states == 1 or alpha[-1] > alpha[-2] else states - 2
    path = np.empty(frames, dtype=np.int64)
    for t in range(frames - 1, -1, -1):
        path[t] = labels[state]
        state -= int(back[t, state])
    return path


def token_spans(log_probs: np.ndarray, path: np.ndarray,
                blank: int) -> list[tuple[int, int, float]]:
    """The runs of equal non-blank labels on ``path``: (first frame, end frame, mean log-prob
    of the label over the run), as torchaudio's ``merge_tokens``."""
    scores = np.asarray(log_probs, dtype=np.float32)[np.arange(len(path)), path]
    change = np.flatnonzero(np.diff(path, prepend=-1, append=-1) != 0)
    return [(int(a), int(b), float(scores[a:b].mean(dtype=np.float32)))
            for a, b in zip(change[:-1], change[1:], strict=True) if path[a] != blank]


def align_words(
    log_probs: np.ndarray,
    words: Sequence[str],
    tokens: Sequence[int],
    spans: Sequence[tuple[int, int]],
    blank: int,
    frame_seconds: float,
    offset_seconds: float = 0.0,
) -> list[Word]:
    """Timed words of a hypothesis by CTC forced alignment to ``log_probs`` (T, V): the words
    of :func:`mamba_asr.alignment.align_words`, in NumPy."""
    log_probs = np.asarray(log_probs, dtype=np.float32)
    ctc_words.check_log_probs(log_probs)

    def align(targets: list[int]) -> list[tuple[int, int, float]]:
        return token_spans(log_probs, forced_align(log_probs, targets, blank), blank)

    return ctc_words.timed_words(words, tokens, spans, tuple(log_probs.shape), blank,
                                 frame_seconds, offset_seconds, align)
