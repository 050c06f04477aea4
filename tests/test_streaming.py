"""Streaming transcription (mamba_asr.streaming): a causal ConMamba model's streamed
log-probabilities equal its offline forward on the whole signal for any chunking, its final
transcript is the offline one, and models that cannot stream say why."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mamba_asr.transcriber import Transcriber

SAMPLE_RATE = 16000
# Chunk sizes from 10 ms to 2 s, in samples; None: random boundaries (1 sample to 1.5 s)
CHUNKS = [160, 800, 1600, 4000, 16000, 32000, None]


@pytest.fixture(scope="module")
def streaming_asr(stream_export: Path) -> Transcriber:
    """The random-weight causal model, with random global feature statistics (so the
    normaliser is not the identity)."""
    asr = Transcriber.from_folder(stream_export)
    norm = asr.hparams.normalize
    gen = torch.Generator().manual_seed(7)
    n_mels = asr.hparams.compute_features.compute_fbanks.n_mels
    norm.glob_mean = torch.randn(n_mels, generator=gen) * 3 - 8
    norm.glob_std = torch.rand(n_mels, generator=gen) * 2 + 1
    return asr


@pytest.fixture(scope="module")
def signal() -> torch.Tensor:
    """7.3 s: noise bursts, a tone and exact silence (the Fbank's -100 dB floor), so that
    frames of very different loudness meet chunk boundaries."""
    gen = torch.Generator().manual_seed(3)
    n = round(7.3 * SAMPLE_RATE)
    t = torch.arange(n) / SAMPLE_RATE
    wav = 0.3 * torch.sin(2 * torch.pi * 220 * t) * (t % 1.1 < 0.6)
    wav = wav + 0.05 * torch.randn(n, generator=gen) * (t % 0.7 < 0.4)
    wav[round(2.0 * SAMPLE_RATE): round(2.5 * SAMPLE_RATE)] = 0.0
    return wav


def offline_log_probs(asr: Transcriber, wav: torch.Tensor) -> torch.Tensor:
    """The model's forward on the whole signal: (T, V)."""
    h = asr.hparams
    with torch.no_grad():
        feats = h.normalize(h.compute_features(wav[None]), torch.ones(1))
        enc = h.Transformer.encode(h.CNN(feats), torch.ones(1))
        return h.log_softmax(h.ctc_lin(enc).float())[0]


def chunks(n: int, size: int | None, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    bounds, lo = [], 0
    while lo < n:
        step = size if size is not None else int(rng.integers(1, round(1.5 * SAMPLE_RATE)))
        bounds.append((lo, min(n, lo + step)))
        lo += step
    return bounds


@pytest.mark.parametrize("size", CHUNKS, ids=lambda s: "random" if s is None else f"{s}smp")
def test_streamed_log_probs_equal_the_offline_forward(
    streaming_asr: Transcriber, signal: torch.Tensor, size: int | None
) -> None:
    if size is not None and size < 1600:  # ~1 ms per feed: 3 s are 300 feeds of 10 ms
        signal = signal[: 3 * SAMPLE_RATE]
    reference = offline_log_probs(streaming_asr, signal)
    stream = streaming_asr.stream()
    for lo, hi in chunks(signal.numel(), size, seed=size or 11):
        stream.feed(signal[lo:hi])
    stream.finish()
    streamed = stream.log_probs()
    assert streamed.shape == reference.shape
    assert (streamed - reference).abs().max().item() <= 1e-4
    assert reference.std().item() > 0.1  # a model whose outputs vary: the check means something


def test_feeds_emit_each_frame_once_its_audio_has_arrived(
    streaming_asr: Transcriber, signal: torch.Tensor
) -> None:
    """Constant look-ahead: after every 40-ms feed the frames encoded are those whose time
    plus the stated look-ahead (46 ms) lies within the audio received."""
    stream = streaming_asr.stream()
    assert stream.lookahead_seconds == pytest.approx(0.046)
    for lo, hi in chunks(round(2 * SAMPLE_RATE), 640, seed=0):
        stream.feed(signal[lo:hi])
        expected = math.floor((hi / SAMPLE_RATE - stream.lookahead_seconds) / 0.04 + 1e-9) + 1
        assert stream.log_probs().shape[0] == max(0, expected)


def test_final_transcript_is_the_offline_transcription(
    streaming_asr: Transcriber, signal: torch.Tensor
) -> None:
    offline = next(iter(streaming_asr.transcribe([(signal, SAMPLE_RATE)])))
    stream = streaming_asr.stream()
    words, partials = [], set()
    for lo, hi in chunks(signal.numel(), None, seed=5):
        update = stream.feed(signal[lo:hi].numpy())  # numpy input too
        words += update.words
        partials.add(update.partial)
        assert update.seconds == pytest.approx(hi / SAMPLE_RATE)
    final = stream.finish()
    assert offline.text  # a random model spells long strings: a strong comparison
    assert final.text == offline.text
    assert [w.word for w in final.words] == [w.word for w in offline.words]
    assert [t for w in final.words for t in (w.start, w.end)] == pytest.approx(
        [t for w in offline.words for t in (w.start, w.end)])
    # the words made final while streaming, and the last one closed by finish(), are the
    # final text, in order, with times inside the audio
    assert stream.final_words[: len(words)] == words
    assert " ".join(w.word for w in stream.final_words) == final.text
    assert all(0 <= w.start < w.end <= final.duration + 0.04 for w in stream.final_words)
    assert len(partials) > 1
    with pytest.raises(ValueError, match="finished"):
        stream.feed(signal[:160])


def test_a_bidirectional_model_cannot_stream(random_export: Path) -> None:
    asr = Transcriber.from_folder(random_export)  # hparams/CTC/demo.yaml: the offline demo
    with pytest.raises(ValueError, match="cannot stream: .*top_db"):
        asr.stream()
    h = asr.hparams  # with a streamable front-end, the normaliser and encoder are named
    h.compute_features.compute_fbanks.top_db = float("inf")
    with pytest.raises(ValueError, match="cannot stream: .*'sentence' statistics"):
        asr.stream()
    h.normalize.norm_type = "global"
    with pytest.raises(ValueError, match="cannot stream: .*bidirectional"):
        asr.stream()


@pytest.mark.parametrize("samples", [0, 160, 1000, 2000])
def test_short_streams_end_as_offline_transcription_does(
    streaming_asr: Transcriber, signal: torch.Tensor, samples: int
) -> None:
    """Shorter than the offline transcriber's 0.1-s padding, a stream is padded alike: its
    final transcript and frame count are the offline ones (also for no audio at all)."""
    wav = signal[round(0.3 * SAMPLE_RATE):][:samples]
    stream = streaming_asr.stream()
    if samples:
        stream.feed(wav)
    final = stream.finish()
    frames = samples // 160 + 1  # feature frames, then as the offline transcriber counts
    expected = -(-frames // 4) if samples >= 1600 else round(frames / 11 * 3)
    assert stream.log_probs().shape[0] == expected
    if samples:
        offline = next(iter(streaming_asr.transcribe([(wav, SAMPLE_RATE)])))
        assert final.text == offline.text
        assert final.duration == pytest.approx(samples / SAMPLE_RATE)
    else:
        assert final.text == "" or final.duration == 0.0
