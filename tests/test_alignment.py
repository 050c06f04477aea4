"""Word timestamps by CTC forced alignment, pause cuts and boundary errors, on synthetic CTC
posteriors with a known frame layout: log-softmax of logits that are 0 except a peak at each
frame's label, so the Viterbi path is the layout and each frame's probability is known."""

from __future__ import annotations

import io
import itertools
import logging
import math

import pytest
import sentencepiece as spm
import torch
from conftest import WORDS
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.decoders import ctc_greedy_decode

from mamba_asr.alignment import (
    BoundaryStats,
    align_words,
    boundary_errors,
    ctc_feasible,
    split_at_blanks,
    split_at_pauses,
    word_targets,
)
from mamba_asr.transcript import Word

BLANK = 0
FRAME = 0.04  # seconds per CTC frame (4 x 10 ms)
PEAK = 8.0  # logit of a frame's label unless a test gives another


def char_encoder() -> CTCTextEncoder:
    """The demo CTC model's map: blank 0, bos 1, eos 2, then " 'A..Z" (space = 3)."""
    encoder = CTCTextEncoder()
    encoder.insert_blank(index=BLANK)
    encoder.insert_bos_eos(bos_index=1, eos_index=2)
    encoder.update_from_iterable(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ", sequence_input=False)
    return encoder


CHARS = char_encoder()
SPACE = CHARS.lab2ind[" "]
VOCAB = len(CHARS)


def encode_chars(word: str) -> list[int]:
    return CHARS.encode_sequence(list(word))


def frames(spec: str) -> list[int]:
    """Each character of ``spec`` is one frame's label: "-" the blank, others the character
    (so "HHI" is H for 2 frames, then I)."""
    return [BLANK if c == "-" else CHARS.lab2ind[c] for c in spec]


def posteriors(
    labels: list[int], vocab: int = VOCAB, peaks: dict[int, float] | None = None
) -> torch.Tensor:
    """(T, vocab) log-probabilities whose frame t peaks at ``labels[t]`` with logit
    ``peaks[t]`` (default PEAK), the other logits 0."""
    heights = [(peaks or {}).get(t, PEAK) for t in range(len(labels))]
    logits = torch.zeros(len(labels), vocab)
    logits[torch.arange(len(labels)), torch.tensor(labels, dtype=torch.long)] = torch.tensor(
        heights
    )
    return logits.log_softmax(dim=-1)


def times(words: list[Word]) -> list[float]:
    """start, end, start, end, ... of ``words`` in seconds."""
    return [t for w in words for t in (w.start, w.end)]


def log_prob(peak: float, vocab: int = VOCAB) -> float:
    """Log-probability of a frame's label whose logit is ``peak`` and the others' 0."""
    return peak - math.log(math.exp(peak) + vocab - 1)


# "HI THERE" in 23 frames: HI covers frames 3-5 -> [0.12, 0.24) s, the space frame 8 is no
# word's, THERE covers frames 10-18 -> [0.40, 0.76) s.
HI_THERE = frames("---HHI-- -THHE-REEE----")
TOKENS = frames("HI THERE")


def test_word_targets_characters() -> None:
    tokens, spans = word_targets(["HI", "THERE"], encode_chars, separator=SPACE)
    assert tokens == TOKENS
    assert TOKENS[2] == SPACE == 3
    assert spans == [(0, 2), (3, 8)]
    assert CHARS.decode_ndim(tokens) == list("HI THERE")


def test_align_words_characters_exact_times_and_probabilities() -> None:
    """The H frames (3, 4) peak at 6 and the I frame (5) at 2, a doubtful letter; the blank
    inside THERE (frame 14) at 3; the rest at PEAK. A word's probability is exp of the mean
    log-probability over its token frames (H, H, I for HI: frame weighted, not token
    weighted), blanks and the space excluded (THERE's letters are all at PEAK)."""
    log_probs = posteriors(HI_THERE, peaks={3: 6.0, 4: 6.0, 5: 2.0, 14: 3.0})
    tokens, spans = word_targets(["HI", "THERE"], encode_chars, separator=SPACE)
    words = align_words(log_probs, ["HI", "THERE"], tokens, spans, BLANK, FRAME)
    assert [w.word for w in words] == ["HI", "THERE"]
    assert times(words) == pytest.approx([0.12, 0.24, 0.40, 0.76])
    hi = math.exp((2 * log_prob(6.0) + log_prob(2.0)) / 3)
    assert words[0].probability == pytest.approx(hi, rel=1e-5)
    assert words[1].probability == pytest.approx(math.exp(log_prob(PEAK)), rel=1e-5)
    assert 0.0 < words[0].probability < words[1].probability < 1.0


def test_align_words_offset_keeps_file_time() -> None:
    tokens, spans = word_targets(["HI", "THERE"], encode_chars, separator=SPACE)
    words = align_words(posteriors(HI_THERE), ["HI", "THERE"], tokens, spans, BLANK, FRAME, 61.5)
    assert times(words) == pytest.approx([61.62, 61.74, 61.90, 62.26])


@pytest.fixture(scope="module")
def sentencepiece_model() -> spm.SentencePieceProcessor:
    """A small unigram model with the recipes' ids (unk 0 = CTC blank, bos 1, eos 2)."""
    sentences = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + i % 4)) for i in range(40)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=30,
        model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_sentencepiece_targets_and_times(sentencepiece_model: spm.SentencePieceProcessor) -> None:
    """Each word encoded on its own starts with a "▁" piece and the targets are the sentence's
    own encoding. Layout: 2 blank frames, then each token 2 frames and a blank, so token k
    covers frames 2 + 3k, 3 + 3k and a word of tokens [a, b) spans frames [2 + 3a, 3b + 1).
    "SCAN SCAN" repeats a piece across words, HELLO's "L L" inside a word."""
    sp = sentencepiece_model
    words = ["HELLO", "SCAN", "SCAN", "THE"]
    tokens, spans = word_targets(words, sp.encode_as_ids, separator=None)
    assert tokens == sp.encode_as_ids(" ".join(words))
    assert [sp.id_to_piece(tokens[a])[0] for a, _ in spans] == ["▁"] * len(words)
    assert all(sp.id_to_piece(t)[0] != "▁" for a, b in spans for t in tokens[a + 1 : b])
    assert any(x == y for x, y in itertools.pairwise(tokens))  # repeats need a blank between
    layout = [BLANK, BLANK] + [label for t in tokens for label in (t, t, BLANK)]
    log_probs = posteriors(layout, vocab=sp.get_piece_size())
    timed = align_words(log_probs, words, tokens, spans, BLANK, FRAME)
    assert [w.word for w in timed] == words
    expected = [frame * FRAME for a, b in spans for frame in (2 + 3 * a, 3 * b + 1)]
    assert times(timed) == pytest.approx(expected)
    peak = math.exp(log_prob(PEAK, sp.get_piece_size()))
    assert [w.probability for w in timed] == pytest.approx([peak] * len(words), rel=1e-5)


def test_infeasible_hypothesis_spreads_times(caplog: pytest.LogCaptureFixture) -> None:
    """8 tokens in 5 frames: CTC cannot emit them; the 0.2 s are shared by token count (HI holds
    tokens 0-1, THERE 3-7 of 8), probability 0, and a warning says so."""
    tokens, spans = word_targets(["HI", "THERE"], encode_chars, separator=SPACE)
    log_probs = posteriors(frames("-HI T"))
    with caplog.at_level(logging.WARNING, logger="mamba_asr.alignment"):
        words = align_words(log_probs, ["HI", "THERE"], tokens, spans, BLANK, FRAME, 1.0)
    assert times(words) == pytest.approx([1.0, 1.05, 1.075, 1.2])
    assert [w.probability for w in words] == [0.0, 0.0]
    assert "8 tokens (2 words) cannot be aligned to 5 frames" in caplog.text


def test_repeated_tokens_need_a_blank_between() -> None:
    """AA is 2 tokens but needs 3 frames (A, blank, A): in 2 frames it is spread, in 3 it
    aligns."""
    tokens, spans = word_targets(["AA"], encode_chars, separator=SPACE)
    assert not ctc_feasible(tokens, 2, BLANK) and ctc_feasible(tokens, 3, BLANK)
    (spread,) = align_words(posteriors(frames("AA")), ["AA"], tokens, spans, BLANK, FRAME)
    assert (spread.start, spread.end, spread.probability) == pytest.approx((0.0, 0.08, 0.0))
    (aligned,) = align_words(posteriors(frames("A-A")), ["AA"], tokens, spans, BLANK, FRAME)
    assert (aligned.start, aligned.end) == pytest.approx((0.0, 0.12))
    assert aligned.probability == pytest.approx(math.exp(log_prob(PEAK)), rel=1e-5)


def test_blank_in_targets_is_spread(sentencepiece_model: spm.SentencePieceProcessor) -> None:
    """SentencePiece's unknown piece is id 0, the CTC blank: such targets cannot be aligned."""
    sp = sentencepiece_model
    tokens, spans = word_targets(["ZEBRA", "SCAN"], sp.encode_as_ids, separator=None)
    assert BLANK in tokens
    log_probs = posteriors([BLANK] * 40, vocab=sp.get_piece_size())
    words = align_words(log_probs, ["ZEBRA", "SCAN"], tokens, spans, BLANK, FRAME)
    per_token = 40 * FRAME / len(tokens)
    assert times(words) == pytest.approx([i * per_token for span in spans for i in span])
    assert [w.probability for w in words] == [0.0, 0.0]


def test_empty_hypothesis() -> None:
    assert word_targets([], encode_chars, separator=SPACE) == ([], [])
    assert align_words(posteriors(HI_THERE), [], [], [], BLANK, FRAME) == []
    assert align_words(torch.zeros(0, VOCAB), [], [], [], BLANK, FRAME) == []


def test_bad_input_is_named() -> None:
    tokens, spans = word_targets(["HI", "THERE"], encode_chars, separator=SPACE)
    log_probs = posteriors(HI_THERE)
    with pytest.raises(ValueError, match=r"1 token spans for 2 words"):
        align_words(log_probs, ["HI", "THERE"], tokens, spans[:1], BLANK, FRAME)
    with pytest.raises(ValueError, match=r"span 1 \(3, 9\) of word 'THERE'"):
        align_words(log_probs, ["HI", "THERE"], tokens, [(0, 2), (3, 9)], BLANK, FRAME)
    with pytest.raises(ValueError, match=r"not log-probabilities"):
        align_words(log_probs.exp() * 3, ["HI", "THERE"], tokens, spans, BLANK, FRAME)
    with pytest.raises(ValueError, match=r"shape \(1, 23, 31\); expected \(frames, vocabulary\)"):
        align_words(log_probs[None], ["HI", "THERE"], tokens, spans, BLANK, FRAME)
    with pytest.raises(ValueError, match=r"outside the model's 31 outputs"):
        align_words(log_probs, ["HI"], [TOKENS[0], 40], [(0, 2)], BLANK, FRAME)
    with pytest.raises(ValueError, match=r"word 1 '' encodes to no tokens"):
        word_targets(["HI", ""], encode_chars, separator=SPACE)


# Speech (A) and pauses: long blank runs [20, 30) and [90, 100), a short one [55, 58).
PAUSES = frames("A" * 20 + "-" * 10 + "A" * 25 + "-" * 3 + "A" * 32 + "-" * 10 + "A" * 6)


def test_split_at_blanks_cuts_in_pauses() -> None:
    """max_frames 40, pauses of 5+ frames: 0-25 ends mid-pause [20, 30); the window 25-65 holds
    no long pause (the rest of the cut one does not count), so the short one [55, 58) is cut at
    56; 56-96 reaches into [90, 100), clipped to [90, 96) and cut at 93; the rest is short."""
    log_probs = posteriors(PAUSES)
    ranges = split_at_blanks(log_probs, BLANK, min_blank_frames=5, max_frames=40)
    assert ranges == [(0, 25), (25, 56), (56, 93), (93, 106)]
    assert all(end - start <= 40 for start, end in ranges)
    # Cut inside blank runs, greedy decoding of the ranges is that of the whole.
    whole = ctc_greedy_decode(log_probs[None], torch.ones(1), blank_id=BLANK)[0]
    pieces = [ctc_greedy_decode(log_probs[None, a:b], torch.ones(1), BLANK)[0] for a, b in ranges]
    assert sum(pieces, []) == whole == frames("AAAA")


def test_split_at_blanks_ends_in_the_last_long_pause() -> None:
    """Pauses [5, 13) and [25, 31), then a short one [35, 37) within the first 40 frames: the
    range ends mid-[25, 31), as long as it may be, not in the longer earlier pause nor in the
    later short one."""
    log_probs = posteriors(
        frames("A" * 5 + "-" * 8 + "A" * 12 + "-" * 6 + "A" * 4 + "--" + "A" * 13)
    )
    assert split_at_blanks(log_probs, BLANK, 5, 40) == [(0, 28), (28, 50)]


def test_split_at_blanks_without_pauses_or_when_short() -> None:
    """No blank: cut every max_frames. Leading silence is no pause to end the first range in
    (it would be a range of silence alone). A short recording is one range, an empty none."""
    speech = posteriors(frames("A" * 100))
    assert split_at_blanks(speech, BLANK, 5, 40) == [(0, 40), (40, 80), (80, 100)]
    leading_silence = posteriors(frames("-" * 10 + "A" * 50))
    assert split_at_blanks(leading_silence, BLANK, 5, 40) == [(0, 40), (40, 60)]
    assert split_at_blanks(posteriors(PAUSES), BLANK, 5, 106) == [(0, 106)]
    assert split_at_blanks(torch.zeros(0, VOCAB), BLANK, 5, 40) == []
    with pytest.raises(ValueError, match=r"max_frames \(0\)"):
        split_at_blanks(speech, BLANK, 5, 0)


def test_split_at_pauses_cuts_every_long_pause_so_words_do_not_merge() -> None:
    """Two utterances end to end, "HI" and "YO" with no space between them: decoded whole,
    one word "HIYO"; cut in the middle of the 6-frame pause between them, two words. Shorter
    blank runs (inside a word) and the leading/trailing silence are not cut."""
    spec = "--HH-II" + "-" * 6 + "Y--OO---"
    log_probs = posteriors(frames(spec))
    assert split_at_pauses(log_probs, BLANK, 5) == [(0, 10), (10, 21)]
    assert split_at_pauses(log_probs, BLANK, 7) == [(0, 21)]
    texts = ["".join(char_encoder().decode_ndim(ctc_greedy_decode(
        log_probs[None, a:b], torch.ones(1), BLANK)[0])) for a, b in
        split_at_pauses(log_probs, BLANK, 5)]
    assert texts == ["HI", "YO"]
    assert split_at_pauses(log_probs[:0], BLANK, 5) == []


def test_boundary_errors_compare_matched_words_only() -> None:
    """Reference HI THERE YOU; hypothesis HI THEIR UM YOU: THERE->THEIR substituted, UM
    inserted, so only HI (start and end 0.02 s off) and YOU (0.05 and 0.10 s off) are
    compared: start 0.035, end 0.06, both 0.0475. Pairing by position would compare YOU with UM.
    """
    reference = [("HI", 0.10, 0.30), ("THERE", 0.40, 0.80), ("YOU", 0.90, 1.10)]
    hypothesis = [
        Word("HI", 0.12, 0.28, 0.9),
        Word("THEIR", 0.40, 0.60, 0.5),
        Word("UM", 0.60, 0.80, 0.3),
        Word("YOU", 0.95, 1.00, 0.8),
    ]
    stats = boundary_errors(reference, hypothesis)
    assert (stats.matched, stats.reference_words, stats.hypothesis_words) == (2, 3, 4)
    assert stats.start_error == pytest.approx(0.035)
    assert stats.end_error == pytest.approx(0.06)
    assert stats.boundary_error == pytest.approx(0.0475)
    # Utterances add up to word-weighted means: an exact word adds a match and no error.
    total = sum([stats, boundary_errors([("A", 1.0, 2.0)], [Word("A", 1.0, 2.0, 1.0)])],
                BoundaryStats())  # fmt: skip
    assert (total.matched, total.reference_words, total.hypothesis_words) == (3, 4, 5)
    assert total.start_error == pytest.approx(0.07 / 3)
    assert total.boundary_error == pytest.approx(0.19 / 6)
    assert math.isnan(boundary_errors(reference, []).boundary_error)
