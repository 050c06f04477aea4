"""The PyTorch-free runtime (mamba_asr.ort) against the torch path it replaces: CTC decoding
and alignment, voice-activity segments, audio loading, and no torch in its process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio.functional as taf
from speechbrain.decoders.ctc import CTCPrefixBeamSearcher, ctc_greedy_decode

from mamba_asr import alignment
from mamba_asr.ctc_words import word_targets
from mamba_asr.ort import ctc

BLANK = 0
CHARS = ["<blank>", " ", "A", "B", "C", "D", "E", "H", "L", "O"]  # a character model's labels


def peaky_log_probs(seed: int, frames: int = 80, vocab: int = len(CHARS)) -> np.ndarray:
    """CTC-like log-probabilities (frames, vocab): mostly blank, a few confident tokens and
    some frames where two or three tokens compete (what makes a beam search differ)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (frames, vocab))
    logits[:, BLANK] += 2.5
    for t in rng.choice(frames, frames // 3, replace=False):
        logits[t, rng.integers(1, vocab)] += rng.uniform(2.0, 7.0)
    logits -= logits.max(axis=1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_decode_matches_speechbrain(seed: int) -> None:
    lp = peaky_log_probs(seed)
    expected = ctc_greedy_decode(torch.from_numpy(lp)[None], torch.ones(1), blank_id=BLANK)[0]
    assert ctc.greedy_decode(lp, BLANK) == expected
    assert len(expected) > 5  # the input has tokens to decode


@pytest.mark.parametrize(("seed", "prune_history", "beam_size"),
                         [(s, s % 2 == 0, 3 + 4 * (s % 3)) for s in range(12)])
def test_prefix_beam_search_matches_speechbrain(seed: int, prune_history: bool,
                                                beam_size: int) -> None:
    lp = peaky_log_probs(100 + seed)
    options = {"beam_size": beam_size, "beam_prune_logp": -12.0, "token_prune_min_logp": -3.0,
               "prune_history": prune_history}
    searcher = CTCPrefixBeamSearcher(blank_index=BLANK, vocab_list=CHARS, **options)
    expected = searcher(torch.from_numpy(lp)[None], torch.ones(1))[0][0].text
    ours = ctc.PrefixBeamSearch(CHARS, BLANK, **options).search(lp)
    assert ours == expected
    assert expected.strip()


def test_prefix_beam_search_differs_from_greedy_somewhere() -> None:
    """The inputs above exercise the search: on some of them it beats the best path."""
    differ = 0
    for seed in range(100, 112):
        lp = peaky_log_probs(seed)
        greedy = "".join(CHARS[i] for i in ctc.greedy_decode(lp, BLANK))
        beam = ctc.PrefixBeamSearch(CHARS, BLANK, beam_size=10, token_prune_min_logp=-3.0)
        differ += " ".join(greedy.split()) != beam.search(lp)
    assert differ > 0


def test_prefix_beam_search_sentencepiece_labels_match_speechbrain() -> None:
    pieces = ["<unk>", "▁HE", "LLO", "▁WOR", "LD", "▁A", "B", "▁", "O"]
    for seed in range(6):
        lp = peaky_log_probs(200 + seed, vocab=len(pieces))
        options = {"beam_size": 8, "token_prune_min_logp": -3.0, "prune_history": False}
        searcher = CTCPrefixBeamSearcher(blank_index=BLANK, vocab_list=pieces, **options)
        expected = searcher(torch.from_numpy(lp)[None], torch.ones(1))[0][0].text
        assert ctc.PrefixBeamSearch(pieces, BLANK, **options).search(lp) == expected


def _targets(lp: np.ndarray, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, lp.shape[0] // 3))
    return rng.integers(1, lp.shape[1], n).tolist()


@pytest.mark.parametrize("seed", range(8))
def test_forced_align_matches_torchaudio(seed: int) -> None:
    lp = peaky_log_probs(300 + seed, frames=40 + 10 * seed)
    targets = _targets(lp, seed)
    if seed == 0:
        targets = [2, 2, 3, 3, 3]  # repeats need a blank between them
    path, scores = taf.forced_align(torch.from_numpy(lp)[None],
                                    torch.tensor([targets], dtype=torch.int32), blank=BLANK)
    ours = ctc.forced_align(lp, targets, BLANK)
    np.testing.assert_array_equal(ours, path[0].numpy())
    expected = [(s.start, s.end, s.score)
                for s in taf.merge_tokens(path[0], scores[0], blank=BLANK)]
    spans = ctc.token_spans(lp, ours, BLANK)
    assert [(a, b) for a, b, _ in spans] == [(a, b) for a, b, _ in expected]
    np.testing.assert_allclose([s for *_, s in spans], [s for *_, s in expected], rtol=1e-6)


def test_forced_align_tight_fit_matches_torchaudio() -> None:
    """As many frames as the targets need: every frame is forced."""
    lp = peaky_log_probs(7, frames=7)
    targets = [2, 3, 3, 4, 5, 6]  # 6 tokens and a blank between the repeated 3s
    path, _ = taf.forced_align(torch.from_numpy(lp)[None],
                               torch.tensor([targets], dtype=torch.int32), blank=BLANK)
    np.testing.assert_array_equal(ctc.forced_align(lp, targets, BLANK), path[0].numpy())


@pytest.mark.parametrize("seed", range(4))
def test_align_words_gives_the_torch_words(seed: int) -> None:
    lp = peaky_log_probs(400 + seed, frames=120)
    words = ["HELLO", "A", "BED", "COOL"][: 2 + seed % 3]
    tokens, spans = word_targets(words, lambda w: [CHARS.index(c) for c in w], CHARS.index(" "))
    expected = alignment.align_words(torch.from_numpy(lp), words, tokens, spans, BLANK,
                                     0.04, offset_seconds=1.5)
    ours = ctc.align_words(lp, words, tokens, spans, BLANK, 0.04, offset_seconds=1.5)
    assert [(w.word, w.start, w.end) for w in ours] == [(w.word, w.start, w.end)
                                                        for w in expected]
    np.testing.assert_allclose([w.probability for w in ours],
                               [w.probability for w in expected], rtol=1e-5)


def test_align_words_infeasible_hypothesis_spread_like_torch() -> None:
    lp = peaky_log_probs(9, frames=4)
    words = ["HELLO"]
    tokens, spans = word_targets(words, lambda w: [CHARS.index(c) for c in w], 1)
    ours = ctc.align_words(lp, words, tokens, spans, BLANK, 0.04)
    assert ours == alignment.align_words(torch.from_numpy(lp), words, tokens, spans, BLANK, 0.04)
    assert ours[0].probability == 0.0


def test_align_words_refuses_logits() -> None:
    with pytest.raises(ValueError, match="not log-probabilities"):
        ctc.align_words(np.zeros((5, 4), np.float32), ["A"], [1], [(0, 1)], BLANK, 0.04)


@pytest.mark.parametrize("seed", range(6))
def test_forced_align_breaks_ties_as_torchaudio(seed: int) -> None:
    """Log-probs on a coarse grid (uniform rows for seed 0): many paths score the same, and the
    path chosen is torchaudio's."""
    lp = peaky_log_probs(500 + seed, frames=30)
    lp = np.full_like(lp, -np.log(lp.shape[1])) if seed == 0 else np.round(lp, 0)
    targets = _targets(lp, seed) if seed else [2, 3, 3, 4]
    path, _ = taf.forced_align(torch.from_numpy(lp)[None],
                               torch.tensor([targets], dtype=torch.int32), blank=BLANK)
    np.testing.assert_array_equal(ctc.forced_align(lp, targets, BLANK), path[0].numpy())
