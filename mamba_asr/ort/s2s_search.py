"""Joint CTC/attention beam search in NumPy over ONNX step decoders: the search of SpeechBrain
1.1.2's ``S2SBeamSearcher`` with its ``CTCScorer`` and ``TransformerLMScorer`` (as the S2S
recipes build it, ``train_S2S.build_searcher``), without torch.

The rules reproduced, step by step (``step`` counts from 0, ``T`` is the padded number of
encoder frames):

- the decoder's log-probabilities are ``log_softmax(logits / temperature)`` weighted by
  ``1 - ctc_weight``; with ``ctc_weight`` 1 the decoder is not run, and the previous step's
  combined scores are carried into the next step (SpeechBrain adds each step's scores to the
  same, unreordered array then: reproduced, see :func:`beam_search`);
- eos gets ``MINUS_INF`` (-1e20) before ``int(T * min_decode_ratio)`` steps and, with
  ``using_eos_threshold``, unless its log-probability exceeds ``eos_threshold`` times the
  step's best;
- CTC (``ctc_weight`` > 0): the blank gets ``MINUS_INF``, then the CTC prefix score's
  increment over the full vocabulary (:class:`CTCPrefixScorer`) weighted ``ctc_weight``;
- the LM: ``log_softmax(logits / lm_temperature)`` weighted ``lm_weight``;
- each item keeps the ``beam_size`` best (sequence score + step score), divided by
  ``step + 1`` with ``length_normalization``, over all its beams and tokens;
- a hypothesis that picks eos is set aside with that (normalised) score while its item has
  fewer than ``beam_size`` ended ones, and its beam gets -inf; the search stops when every
  item has ``beam_size`` or after ``int(T * max_decode_ratio)`` steps; then the living
  hypotheses of unfinished items fill them up with their last scores (without length
  normalisation, those that ended at the last step with -inf, as SpeechBrain's in-place mask
  leaves them);
- the best-scoring set-aside hypothesis wins, without its last token (the eos, or the last
  token of one that never ended: SpeechBrain's ``undo_padding`` of ``(length - 1)``).

Arithmetic is float32 like SpeechBrain's, in the same order, so that the same numbers rank
alike: the softmaxes' exponentials and logarithms are computed in float64 and rounded, as
torch's float32 kernels are close to correctly rounded (NumPy's float32 ``exp`` is not); sums
of many terms differ from torch's in the last bit at times. The step graphs give no
attention weights: ``ctc_window_size`` then has no effect (as in SpeechBrain for the Mamba
decoder) and ``using_max_attn_shift`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar

import numpy as np

__all__ = ["MINUS_INF", "CTCPrefixScorer", "SearchOptions", "StepDecoder", "beam_search"]

MINUS_INF = np.float32(-1e20)  # SpeechBrain's ``minus_inf``: blocks a token, stays finite

State = TypeVar("State")


class StepDecoder(Protocol[State]):
    """A decoder (or LM) that scores the next token of a batch of prefixes. The search gives
    ``init`` the B items and repeats each state ``beam_size`` times through ``reorder``
    (index ``np.repeat(arange(B), beam_size)``), then reorders by each step's parents."""

    def init(self, encoder_out: np.ndarray, encoder_lengths: np.ndarray) -> State:
        """encoder_out (B, T, D), encoder_lengths (B,) valid frames -> the state of B items."""

    def step(self, prefix: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """prefix (N, t) int64 tokens so far, bos first -> logits (N, vocab), new state."""

    def reorder(self, state: State, index: np.ndarray) -> State:
        """The state of items ``index`` (N',) of ``state``."""


# --------------------------------------------------------------------------- options


def _flag(value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true"):
        return True
    if text in ("0", "false"):
        return False
    raise ValueError(f"expected 1/0 (or true/false), got {value!r}")


@dataclass(frozen=True)
class SearchOptions:
    """The test beam search of an S2S export (``encoder.onnx``'s ``metadata_props``);
    defaults are ``S2SBeamSearcher``'s."""

    bos_id: int
    eos_id: int
    blank_id: int
    beam_size: int
    min_decode_ratio: float = 0.0
    max_decode_ratio: float = 1.0
    decoder_type: str = "mamba"
    ctc_weight: float = 0.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    lm_temperature: float = 1.0
    length_normalization: bool = True
    using_eos_threshold: bool = True
    eos_threshold: float = 1.5
    using_max_attn_shift: bool = False
    max_attn_shift: int = 60
    ctc_window_size: int = 0
    has_lm: bool = False

    def __post_init__(self) -> None:
        if self.decoder_type not in ("mamba", "transformer"):
            raise ValueError(
                f"decoder_type must be mamba or transformer, not {self.decoder_type!r}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, not {self.beam_size}")
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be within [0, 1], not {self.ctc_weight}")
        if self.ctc_weight > 0 and len({self.bos_id, self.eos_id, self.blank_id}) < 3:
            raise ValueError("joint CTC scoring needs distinct bos_id, eos_id and blank_id, not "
                             f"{self.bos_id}, {self.eos_id}, {self.blank_id}")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> SearchOptions:
        """Options from string ``metadata_props`` (as ``encoder.onnx`` holds them; other keys
        ignored): a key missing takes the default; bos_id, eos_id, blank_id or beam_size
        missing, or a value that does not parse, raises ValueError naming it."""
        kwargs: dict[str, Any] = {}
        for field in fields(cls):
            if field.name not in metadata:
                continue
            value = metadata[field.name]
            parse = {"int": int, "float": float, "bool": _flag, "str": str}[str(field.type)]
            try:
                kwargs[field.name] = parse(value)
            except ValueError as exc:
                raise ValueError(f"metadata {field.name}={value!r}: expected {field.type} "
                                 f"({exc})") from None
        missing = [name for name in ("bos_id", "eos_id", "blank_id", "beam_size")
                   if name not in kwargs]
        if missing:
            raise ValueError(f"metadata lacks {', '.join(missing)} (the beam search's settings)")
        return cls(**kwargs)


# --------------------------------------------------------------------------- log-space helpers


def _exp(x: np.ndarray) -> np.ndarray:
    """float32 exp, rounded from float64."""
    return np.exp(x.astype(np.float64)).astype(np.float32)


def _log(x: np.ndarray) -> np.ndarray:
    """float32 log, rounded from float64."""
    return np.log(x.astype(np.float64)).astype(np.float32)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """torch.logsumexp in float32: the max subtracted (0 where it is infinite), summed, added."""
    peak = x.max(axis=axis, keepdims=True)
    peak[np.isinf(peak)] = 0
    total = _exp(x - peak).astype(np.float64).sum(axis=axis).astype(np.float32)
    return _log(total) + np.squeeze(peak, axis=axis)


def _logaddexp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`_logsumexp` of two stacked arrays, without stacking them."""
    peak = np.maximum(a, b)
    peak[np.isinf(peak)] = 0
    return _log(_exp(a - peak) + _exp(b - peak)) + peak


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log_softmax(logits / temperature) over the last axis, float32: (N, V) -> (N, V)."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    shifted = x - x.max(axis=-1, keepdims=True)
    total = _exp(shifted).astype(np.float64).sum(axis=-1, keepdims=True).astype(np.float32)
    return shifted - _log(total)


# --------------------------------------------------------------------------- CTC prefix score


class CTCPrefixScorer:
    """CTC prefix scores of every next token for all hypotheses (SpeechBrain's
    ``CTCPrefixScore``, full vocabulary, no window; Watanabe et al. 2017, Algorithm 2).

    ``log_probs`` (B, T, V) CTC log-probabilities, ``lengths`` (B,) valid frames; the
    hypotheses are B * ``beam_size`` rows, item-major. Frames past an item's length score
    ``MINUS_INF`` except token 0 (0: SpeechBrain pads column 0, its recipes' blank).

    Each hypothesis keeps ``r`` (T, 2, N): the log-probability of its prefix up to frame t
    ending in a token (0) or a blank (1). The prefix score ``psi`` of an extension needs only
    the parent's ``r``, so :meth:`score` streams it frame by frame over (N, V) (SpeechBrain
    holds (T, 2, N, V)) and :meth:`select` runs the ``r`` recursion for the extensions kept
    alone; both give SpeechBrain's numbers element for element.
    """

    def __init__(self, log_probs: np.ndarray, lengths: np.ndarray, blank_id: int, eos_id: int,
                 beam_size: int) -> None:
        x = np.array(log_probs, dtype=np.float32)  # a copy: padded frames are overwritten
        batch, frames, vocab = x.shape
        padded = np.arange(frames)[None, :] >= np.asarray(lengths)[:, None]  # (B, T)
        x[padded] = MINUS_INF
        x[..., 0][padded] = 0
        self.blank_id, self.eos_id = blank_id, eos_id
        self.batch, self.beam_size, self.vocab = batch, beam_size, vocab
        self.item = np.repeat(np.arange(batch), beam_size)  # (N,) each row's item
        self.last_frame = np.asarray(lengths, dtype=np.int64)[self.item] - 1
        self.x = np.ascontiguousarray(x.transpose(1, 0, 2))  # (T, B, V)
        self.x_blank = self.x[:, self.item, blank_id]  # (T, N)
        self.prefix_length = -1
        n = batch * beam_size
        self.r = np.full((frames, 2, n), MINUS_INF, dtype=np.float32)
        blank_sums = np.cumsum(x[:, :, blank_id].astype(np.float64), axis=1).astype(np.float32)
        self.r[:, 1] = blank_sums[self.item].T  # the empty prefix: blanks only
        self.psi = np.zeros((n, 1), dtype=np.float32)  # each hypothesis' prefix score

    def score(self, last_tokens: np.ndarray) -> tuple[np.ndarray, tuple]:
        """last_tokens (N,) of the prefixes -> score increments (N, V) of every extension,
        and what :meth:`select` needs."""
        self.prefix_length += 1
        start = max(1, self.prefix_length)
        r_sum = _logaddexp(self.r[:, 0], self.r[:, 1])  # (T, N): the prefix by frame t
        # psi: logsumexp over t >= start of phi[t - 1] + x[t] (phi: the prefix's probability
        # before the new token, only its blank-ending part when the token repeats its last),
        # and of r[start - 1, 0] (the token at the first frame; -inf after the first step)
        # (two passes, max then sum, each term made twice: (N, V) at a time, not (T, N, V))
        frames = range(start, len(self.x))
        first = (self.x[0][self.item] if self.prefix_length == 0
                 else np.full((len(self.item), self.vocab), MINUS_INF, dtype=np.float32))
        peak = first.copy()
        for t in frames:
            np.maximum(peak, self._phi_x(t, r_sum, last_tokens), out=peak)
        peak[np.isinf(peak)] = 0
        total = np.zeros(peak.shape, dtype=np.float64)
        for t in frames:  # NumPy's float32 exp: the loop's cost (25x faster than _exp's), and
            # the increments equal SpeechBrain's as often (97 %: the sum's order differs anyway)
            total += np.exp(self._phi_x(t, r_sum, last_tokens) - peak)
        total += np.exp(first - peak)
        psi = _log(total.astype(np.float32)) + peak
        rows = np.arange(len(self.item))
        psi[rows, self.eos_id] = r_sum[self.last_frame, rows]
        if self.eos_id != self.blank_id:
            psi[:, self.blank_id] = MINUS_INF
        return psi - self.psi, (psi, r_sum, last_tokens)

    def _phi_x(self, t: int, r_sum: np.ndarray, last_tokens: np.ndarray) -> np.ndarray:
        """phi[t - 1] + x[t] of every extension: (N, V)."""
        term = (r_sum[t - 1].reshape(self.batch, self.beam_size, 1)
                + self.x[t][:, None, :]).reshape(-1, self.vocab)
        rows = np.arange(len(self.item))
        term[rows, last_tokens] = self.r[t - 1, 1] + self.x[t, self.item, last_tokens]
        return term

    def select(self, scored: tuple, candidates: np.ndarray) -> None:
        """Keep the extensions picked: candidates (B, beam) flat indices of (beam, V) per
        item (the parent beam times V plus the token)."""
        psi, r_sum, last_tokens = scored
        parents = (candidates // self.vocab + np.arange(self.batch)[:, None]
                   * self.beam_size).reshape(-1)
        tokens = (candidates % self.vocab).reshape(-1)
        self.psi = psi[parents, tokens][:, None]
        frames = len(self.x)
        # phi of the kept extensions (T, N) and their tokens' log-probabilities (T, N)
        phi = np.where(tokens == last_tokens[parents], self.r[:, 1, parents], r_sum[:, parents])
        x_token = self.x[:, self.item, tokens]
        r = np.full((frames, 2, len(tokens)), MINUS_INF, dtype=np.float32)
        if self.prefix_length == 0:
            r[0, 0] = x_token[0]
        for t in range(max(1, self.prefix_length), frames):
            r[t, 0] = _logaddexp(r[t - 1, 0], phi[t - 1]) + x_token[t]
            r[t, 1] = _logaddexp(r[t - 1, 0], r[t - 1, 1]) + self.x_blank[t]
        self.r = r


# --------------------------------------------------------------------------- the search


@dataclass
class _Ended:
    """The hypotheses set aside for one item: token sequences (bos dropped) and scores."""

    tokens: list[np.ndarray]
    scores: list[np.float32]


def _mask_eos(log_probs: np.ndarray, step: int, min_steps: int, options: SearchOptions) -> None:
    """Block eos (in place) before ``min_steps`` and, with the eos threshold, below it."""
    eos = options.eos_id
    if step < min_steps:
        log_probs[:, eos] = MINUS_INF
    if options.using_eos_threshold:
        keep = log_probs[:, eos] > np.float32(options.eos_threshold) * log_probs.max(axis=-1)
        log_probs[:, eos] = np.where(keep, log_probs[:, eos], MINUS_INF)


def _top_beams(scores: np.ndarray, beam_size: int) -> np.ndarray:
    """scores (B, beam * V) -> the flat indices (B, beam_size) of the best, best first (ties:
    the lower index first)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :beam_size]


def _set_aside(ended: list[_Ended], rows: np.ndarray, prefix: np.ndarray, scores: np.ndarray,
               beam_size: int) -> None:
    """Add the hypotheses of ``rows`` (in order) to their items' ended ones, up to beam_size."""
    for row in rows:
        item = ended[row // beam_size]
        if len(item.scores) < beam_size:
            item.tokens.append(prefix[row, 1:].copy())
            item.scores.append(scores[row])


def _best(item: _Ended) -> list[int]:
    """The best ended hypothesis' tokens, without its last one."""
    if not item.scores:
        return []
    best = int(np.argmax(np.asarray(item.scores, dtype=np.float32)))
    return item.tokens[best][:-1].tolist()


class _Scorers:
    """The decoder, the CTC prefix scorer and the LM of a search, in SpeechBrain's order: each
    step's combined log-probabilities (N, V), and their states following the beams."""

    def __init__(self, decoder: StepDecoder, lm: StepDecoder | None, encoder_out: np.ndarray,
                 encoder_lengths: np.ndarray, ctc_log_probs: np.ndarray,
                 options: SearchOptions) -> None:
        self.options = options
        beams = np.repeat(np.arange(len(encoder_out)), options.beam_size)  # (N,) item per row
        self.decoder_weight = np.float32(1.0 - options.ctc_weight)
        self.decoder = decoder if self.decoder_weight > 0 else None
        if self.decoder is not None:
            self.state = decoder.reorder(decoder.init(encoder_out, encoder_lengths), beams)
        self.lm = lm if lm is not None and options.lm_weight != 0 else None
        if self.lm is not None:
            self.lm_state = self.lm.reorder(self.lm.init(encoder_out, encoder_lengths), beams)
        self.ctc = None
        if options.ctc_weight > 0:
            self.ctc = CTCPrefixScorer(ctc_log_probs, encoder_lengths, options.blank_id,
                                       options.eos_id, options.beam_size)
        self.vocab = ctc_log_probs.shape[-1]
        # carried from step to step when the decoder is off (ctc_weight 1): SpeechBrain then
        # adds each step's scores to the previous step's array, in place
        self.log_probs = np.zeros((len(beams), self.vocab), dtype=np.float32)

    def score(self, prefix: np.ndarray, step: int, min_steps: int) -> np.ndarray:
        """prefix (N, t) bos first -> log-probabilities (N, V) of each next token."""
        options = self.options
        if self.decoder is not None:
            logits, self.state = self.decoder.step(prefix, self.state)
            if logits.shape[-1] != self.vocab:
                raise ValueError(f"the decoder gives {logits.shape[-1]} logits, the CTC head "
                                 f"{self.vocab}: not the same vocabulary")
            self.log_probs = self.decoder_weight * log_softmax(logits, options.temperature)
        log_probs = self.log_probs
        _mask_eos(log_probs, step, min_steps, options)
        if self.ctc is not None:
            log_probs[:, options.blank_id] = MINUS_INF
            increments, self.ctc_scored = self.ctc.score(prefix[:, -1])
            log_probs += increments * np.float32(options.ctc_weight)
        if self.lm is not None:
            lm_logits, self.lm_state = self.lm.step(prefix, self.lm_state)
            lm_log_probs = log_softmax(lm_logits, options.lm_temperature)
            log_probs += lm_log_probs * np.float32(options.lm_weight)
        return log_probs

    def follow(self, parents: np.ndarray, candidates: np.ndarray) -> None:
        """Keep the states of the extensions picked: parents (N,) rows, candidates (B, beam)
        flat indices of (beam, V) per item."""
        if self.decoder is not None:
            self.state = self.decoder.reorder(self.state, parents)
        if self.ctc is not None:
            self.ctc.select(self.ctc_scored, candidates)
        if self.lm is not None:
            self.lm_state = self.lm.reorder(self.lm_state, parents)


def beam_search(decoder: StepDecoder, encoder_out: np.ndarray, encoder_lengths: np.ndarray,
                ctc_log_probs: np.ndarray, options: SearchOptions,
                lm: StepDecoder | None = None) -> list[list[int]]:
    """The best hypothesis of each item (tokens without bos and eos).

    encoder_out (B, T, D) and encoder_lengths (B,) valid frames, as ``decoder.init`` takes
    them; ctc_log_probs (B, T, V) (used when ``options.ctc_weight`` > 0); ``lm`` fused with
    ``options.lm_weight`` when given (and that weight is not 0). With no step allowed
    (``int(T * max_decode_ratio)`` 0, where SpeechBrain fails) every hypothesis is empty.
    """
    if options.using_max_attn_shift:
        raise ValueError("using_max_attn_shift needs attention weights, which the step "
                         "decoders do not give: set it to 0")
    encoder_lengths = np.asarray(encoder_lengths, dtype=np.int64)
    batch, frames = encoder_out.shape[:2]
    beam, vocab = options.beam_size, ctc_log_probs.shape[-1]
    n = batch * beam
    min_steps = int(frames * options.min_decode_ratio)
    max_steps = int(frames * options.max_decode_ratio)
    if options.ctc_weight > 0 and max_steps > frames + 1:
        raise ValueError(f"max_decode_ratio {options.max_decode_ratio}: with CTC scoring a "
                         "hypothesis cannot have more tokens than encoder frames")
    scorers = _Scorers(decoder, lm, encoder_out, encoder_lengths, ctc_log_probs, options)

    prefix = np.full((n, 1), options.bos_id, dtype=np.int64)
    sequence_scores = np.full(n, -np.inf, dtype=np.float32)
    sequence_scores[::beam] = 0  # one live beam per item at first: no duplicates
    ended = [_Ended([], []) for _ in range(batch)]
    scores = None
    for step in range(max_steps):
        if all(len(item.scores) == beam for item in ended):
            break
        scores = sequence_scores[:, None] + scorers.score(prefix, step, min_steps)
        if options.length_normalization:
            scores = scores / np.float32(step + 1)
        candidates = _top_beams(scores.reshape(batch, -1), beam)  # (B, beam)
        scores = np.take_along_axis(scores.reshape(batch, -1), candidates, axis=1).reshape(n)
        tokens = (candidates % vocab).reshape(n)
        parents = (candidates // vocab + np.arange(batch)[:, None] * beam).reshape(n)
        # without length normalisation SpeechBrain's sequence scores are ``scores`` itself,
        # so the eos mask below reaches both
        sequence_scores = (scores * np.float32(step + 1) if options.length_normalization
                           else scores)
        scorers.follow(parents, candidates)
        prefix = np.concatenate((prefix[parents], tokens[:, None]), axis=1)

        is_eos = tokens == options.eos_id
        _set_aside(ended, np.flatnonzero(is_eos), prefix, scores, beam)
        sequence_scores[is_eos] = -np.inf

    if scores is not None and not all(len(item.scores) == beam for item in ended):
        _set_aside(ended, np.arange(n), prefix, scores, beam)
    return [_best(item) for item in ended]
