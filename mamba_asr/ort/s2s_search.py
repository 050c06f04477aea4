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

Arithmetic is float32 like SpeechBrain's, in the same order; exponentials and logarithms are
computed in float64 and rounded, as torch's float32 kernels are close to correctly rounded
(NumPy's float32 ``exp`` is not), so that the same numbers rank alike. The step graphs give no
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
    """A decoder (or LM) that scores the next token of a batch of prefixes."""

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
        """Options from string ``metadata_props`` (as ``encoder.onnx`` holds them); a key
        missing takes the default, a required one missing or a value that does not parse
        raises ValueError naming it."""
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
        required = [f.name for f in fields(cls) if f.name in ("bos_id", "eos_id", "blank_id",
                                                                "beam_size")]
        missing = [name for name in required if name not in kwargs]
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
    """

    def __init__(self, log_probs: np.ndarray, lengths: np.ndarray, blank_id: int, eos_id: int,
                 beam_size: int) -> None:
        x = np.array(log_probs, dtype=np.float32)  # a copy: padded frames are overwritten
        batch, frames, vocab = x.shape
        padded = np.arange(frames)[None, :] >= np.asarray(lengths)[:, None]  # (B, T)
        x[padded] = MINUS_INF
        x[..., 0][padded] = 0
        self.blank_id, self.eos_id, self.beam_size = blank_id, eos_id, beam_size
        self.vocab = vocab
        self.last_frame = np.repeat(np.asarray(lengths, dtype=np.int64) - 1, beam_size)
        self.x_token = np.repeat(x.transpose(1, 0, 2), beam_size, axis=1)  # (T, N, V)
        self.x_blank = self.x_token[:, :, blank_id]  # (T, N)
        self.prefix_length = -1
        n = batch * beam_size
        # r: (T, 2, N) log-probability of the prefix at frame t ending in a token (0) or
        # a blank (1); the empty prefix is all blanks
        self.r = np.full((frames, 2, n), MINUS_INF, dtype=np.float32)
        blank_sums = np.cumsum(x[:, :, blank_id].astype(np.float64), axis=1).astype(np.float32)
        self.r[:, 1] = np.repeat(blank_sums, beam_size, axis=0).T
        self.psi = np.zeros((n, 1), dtype=np.float32)  # each hypothesis' prefix score

    def score(self, last_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """last_tokens (N,) of the prefixes -> score increments (N, V) of each extension and
        the extended prefixes' r (T, 2, N, V) and scores psi (N, V), kept by :meth:`select`."""
        self.prefix_length += 1
        frames, n = self.x_blank.shape
        rows = np.arange(n)
        r_prev = self.r
        r = np.full((frames, 2, n, self.vocab), MINUS_INF, dtype=np.float32)
        if self.prefix_length == 0:
            r[0, 0] = self.x_token[0]
        r_sum = _logaddexp(r_prev[:, 0], r_prev[:, 1])  # (T, N)
        # phi: the prefix's probability before a new token (only its blank-ending part when
        # the token repeats the prefix's last)
        phi = np.repeat(r_sum[:, :, None], self.vocab, axis=2)  # (T, N, V)
        phi[:, rows, last_tokens] = r_prev[:, 1, rows]
        start = max(1, self.prefix_length)
        for t in range(start, frames):
            r[t, 0] = _logaddexp(r[t - 1, 0], phi[t - 1]) + self.x_token[t]
            r[t, 1] = _logaddexp(r[t - 1, 0], r[t - 1, 1]) + self.x_blank[t][:, None]
        phi_shifted = np.concatenate((phi[:1], phi[:-1]), axis=0) + self.x_token
        psi = _logsumexp(np.concatenate((phi_shifted[start:], r[start - 1, 0][None]), axis=0),
                         axis=0)
        psi[rows, self.eos_id] = r_sum[self.last_frame, rows]
        if self.eos_id != self.blank_id:
            psi[:, self.blank_id] = MINUS_INF
        return psi - self.psi, (r, psi)

    def select(self, scored: tuple[np.ndarray, np.ndarray], candidates: np.ndarray) -> None:
        """Keep the extensions picked: candidates (B, beam) flat indices of (beam, V) per item."""
        r, psi = scored
        batch, beam = candidates.shape
        flat = (candidates + np.arange(batch)[:, None] * beam * self.vocab).reshape(-1)
        self.psi = psi.reshape(-1)[flat][:, None]
        self.r = r.reshape(r.shape[0], 2, -1)[:, :, flat]


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


def beam_search(decoder: StepDecoder, encoder_out: np.ndarray, encoder_lengths: np.ndarray,
                ctc_log_probs: np.ndarray, options: SearchOptions,
                lm: StepDecoder | None = None) -> list[list[int]]:
    """The best hypothesis of each item (tokens without bos and eos).

    encoder_out (B, T, D) and encoder_lengths (B,) valid frames, as ``decoder.init`` takes
    them; ctc_log_probs (B, T, V) (used when ``options.ctc_weight`` > 0); ``lm`` fused with
    ``options.lm_weight`` when given (and that weight is not 0).
    """
    if options.using_max_attn_shift:
        raise ValueError("using_max_attn_shift needs attention weights, which the step "
                         "decoders do not give: set it to 0")
    encoder_lengths = np.asarray(encoder_lengths, dtype=np.int64)
    batch, frames = encoder_out.shape[:2]
    beam, eos = options.beam_size, options.eos_id
    n = batch * beam
    vocab = ctc_log_probs.shape[-1]
    min_steps = int(frames * options.min_decode_ratio)
    max_steps = int(frames * options.max_decode_ratio)
    dec_weight = np.float32(1.0 - options.ctc_weight)
    ctc = None
    if options.ctc_weight > 0:
        if max_steps > frames + 1:
            raise ValueError(f"max_decode_ratio {options.max_decode_ratio}: with CTC scoring a "
                             "hypothesis cannot have more tokens than encoder frames")
        ctc = CTCPrefixScorer(ctc_log_probs, encoder_lengths, options.blank_id, eos, beam)
    use_lm = lm is not None and options.lm_weight != 0
    beams = np.repeat(np.arange(batch), beam)
    if dec_weight > 0:
        state = decoder.reorder(decoder.init(encoder_out, encoder_lengths), beams)
    if use_lm:
        lm_state = lm.reorder(lm.init(encoder_out, encoder_lengths), beams)

    prefix = np.full((n, 1), options.bos_id, dtype=np.int64)
    sequence_scores = np.full(n, -np.inf, dtype=np.float32)
    sequence_scores[::beam] = 0  # one live beam per item at first: no duplicates
    log_probs = np.zeros((n, vocab), dtype=np.float32)  # carried over when the decoder is off
    ended = [_Ended([], []) for _ in range(batch)]
    scores = None
    for step in range(max_steps):
        if all(len(item.scores) == beam for item in ended):
            break
        if dec_weight > 0:
            logits, state = decoder.step(prefix, state)
            log_probs = dec_weight * log_softmax(logits, options.temperature)
        _mask_eos(log_probs, step, min_steps, options)
        if ctc is not None:
            log_probs[:, options.blank_id] = MINUS_INF
            increments, ctc_scored = ctc.score(prefix[:, -1])
            log_probs += increments * np.float32(options.ctc_weight)
        if use_lm:
            lm_logits, lm_state = lm.step(prefix, lm_state)
            log_probs += log_softmax(lm_logits, options.lm_temperature) * np.float32(
                options.lm_weight)

        scores = sequence_scores[:, None] + log_probs
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

        if dec_weight > 0:
            state = decoder.reorder(state, parents)
        if ctc is not None:
            ctc.select(ctc_scored, candidates)
        if use_lm:
            lm_state = lm.reorder(lm_state, parents)
        prefix = np.concatenate((prefix[parents], tokens[:, None]), axis=1)

        is_eos = tokens == eos
        _set_aside(ended, np.flatnonzero(is_eos), prefix, scores, beam)
        sequence_scores[is_eos] = -np.inf

    if scores is not None and not all(len(item.scores) == beam for item in ended):
        _set_aside(ended, np.arange(n), prefix, scores, beam)
    return [_best(item) for item in ended]
