"""Streaming Conformer baseline: SpeechBrain's Dynamic Chunk Training (DCT) in the CTC recipe
(``dynchunktrain_config_sampler``) and the chunked encoder streamer
(:class:`mamba_asr.streaming.conformer.ConformerStreamer`), on random-weight models of
``hparams/CTC/conformer_streaming_*.yaml``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from conftest import REPO, n_params
from hyperpyyaml import load_hyperpyyaml
from param_counts import ctc_model_params
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig

import train_CTC
from mamba_asr.config import load_config
from mamba_asr.streaming import make_encoder_streamer
from mamba_asr.streaming.conformer import ConformerStreamer
from modules.features import Fbank

CTC = REPO / "hparams" / "CTC"
STREAMING = ("conformer_streaming_demo", "conformer_streaming_small")


def _load(name: str, tmp_path: Path, **overrides: object) -> dict:
    with open(CTC / f"{name}.yaml", encoding="utf-8") as f:
        return load_hyperpyyaml(f, {"data_folder": str(tmp_path),
                                    "output_folder": str(tmp_path / "out"), **overrides})


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    return _load("conformer_streaming_demo", tmp_path_factory.mktemp("conformer"))


# --------------------------------------------------------------------------- configurations


@pytest.mark.parametrize("name", STREAMING)
def test_streaming_configurations(name: str, tmp_path: Path) -> None:
    """DCT sampler as SpeechBrain's LibriSpeech streaming recipe; valid/test and the streamer
    use chunks of 8 frames (320 ms) with 4 chunks (1.28 s) of left context; streamable
    features (no per-recording dB floor, global statistics); a non-causal Conformer."""
    h = _load(name, tmp_path)
    streaming = DynChunkTrainConfig(8, 4)
    sampler = h["dynchunktrain_config_sampler"]
    assert (sampler.chunkwise_prob, sampler.chunk_size_min, sampler.chunk_size_max) == (0.6, 8, 32)
    assert (sampler.limited_left_context_prob, sampler.left_context_chunks_min,
            sampler.left_context_chunks_max) == (0.75, 2, 32)
    assert sampler(sb.Stage.VALID) == sampler(sb.Stage.TEST) == streaming
    assert h["Transformer"].streaming_config == streaming
    assert h["Transformer"].encoder_module == "conformer" and not h["Transformer"].causal
    assert isinstance(h["compute_features"], Fbank) and h["compute_features"].streamable
    assert h["normalize"].norm_type == "global"
    torch.manual_seed(1)
    drawn = [sampler(sb.Stage.TRAIN) for _ in range(400)]
    chunked = [c for c in drawn if c is not None]
    assert 0.5 < len(chunked) / len(drawn) < 0.7
    assert {c.chunk_size for c in chunked} <= set(range(8, 33))


def test_parameter_counts(tmp_path: Path) -> None:
    """The demo is docs/demo.md's 4-layer Conformer (2.06 M); small is conformer_small."""
    assert n_params(_load("conformer_streaming_demo", tmp_path)["model"]) == ctc_model_params(
        "conformer", 144, 576, 4, 40, (32, 16)) == 2_059_727
    assert n_params(_load("conformer_streaming_small", tmp_path)["model"]) == ctc_model_params(
        "conformer", 144, 1024, 12, 80, (64, 32))


# --------------------------------------------------------------------------- model


def test_forward_with_dct_config_is_encode_and_hides_the_future(demo: dict) -> None:
    """``forward(..., dynchunktrain_config=)`` (what the recipe calls) equals ``encode`` with
    it; no output frame depends on the frames after its chunk (chunked attention, Dynamic Chunk
    Convolution); with full context the outputs differ."""
    transformer = demo["Transformer"].eval()
    config = DynChunkTrainConfig(8, 1)
    src = torch.randn(2, 40, 160)
    with torch.no_grad():
        out = transformer(src, None, torch.ones(2), dynchunktrain_config=config)[0]
        assert torch.allclose(out, transformer.encode(src, torch.ones(2), 0, config), atol=1e-6)
        assert not torch.allclose(out, transformer(src, None, torch.ones(2))[0], atol=1e-3)
        changed = src.clone()
        changed[:, 16:] = torch.randn(2, 24, 160)  # chunks 2.. differ
        again = transformer(changed, None, torch.ones(2), dynchunktrain_config=config)[0]
    assert torch.allclose(again[:, :16], out[:, :16], atol=1e-6)  # chunks 0 and 1: the past
    assert not torch.allclose(again[:, 16:24], out[:, 16:24], atol=1e-3)
    with pytest.raises(ValueError, match="encoder-only"):
        transformer(src, torch.zeros(2, 3, dtype=torch.long), None, dynchunktrain_config=config)


def test_streamer_equals_chunked_offline_encode(demo: dict) -> None:
    """Front-end frames fed in pieces of random sizes (empty ones included) give the offline
    chunked pass's outputs, ``encode(src, dynchunktrain_config=<streaming config>)``, to 1e-4:
    whole chunks come out of ``step`` as soon as they are complete, the partial last one from
    ``flush``."""
    transformer = demo["Transformer"].eval()
    config = transformer.streaming_config
    rng = random.Random(0)
    for length in (1, 7, 8, 9, 45, 120):
        src = torch.randn(1, length, 160)
        with torch.no_grad():
            offline = transformer.encode(src, torch.ones(1), dynchunktrain_config=config)
            streamer = make_encoder_streamer(transformer)
            assert isinstance(streamer, ConformerStreamer)
            assert (streamer.chunk_frames, streamer.lookahead_frames) == (8, 0)
            outs, fed = [], 0
            while fed < length:
                n = rng.choice([0, 1, 3, 8, 13, rng.randint(0, 30)])
                out = streamer.step(src[:, fed : fed + n])
                fed += min(n, length - fed)
                assert out.shape[1] == fed // 8 * 8 - sum(o.shape[1] for o in outs)
                outs.append(out)
            tail = streamer.flush()
        assert (tail is None) == (length % 8 == 0)
        streamed = torch.cat(outs + ([tail] if tail is not None else []), dim=1)
        assert streamed.shape == offline.shape == (1, length, 144)
        assert (streamed - offline).abs().max().item() <= 1e-4, length


def test_streamer_takes_4d_frames_and_another_config(demo: dict) -> None:
    """(1, L, C, F') CNN frames are flattened as ``encode`` does; an explicit configuration
    replaces the model's."""
    transformer = demo["Transformer"].eval()
    config = DynChunkTrainConfig(4, 2)
    src = torch.randn(1, 21, 16, 10)
    with torch.no_grad():
        offline = transformer.encode(src, torch.ones(1), dynchunktrain_config=config)
        streamer = ConformerStreamer(transformer, config)
        streamed = torch.cat([streamer.step(src[:, :10]), streamer.step(src[:, 10:]),
                              streamer.flush()], dim=1)
    assert streamer.chunk_frames == 4
    assert (streamed - offline).abs().max().item() <= 1e-4


def test_models_that_cannot_stream_chunkwise_say_why(tmp_path: Path) -> None:
    small = _load("conformer_small", tmp_path)["Transformer"]  # no DCT: no stream config
    with pytest.raises(ValueError, match="no streaming chunk configuration"):
        ConformerStreamer(small)
    with pytest.raises(ValueError, match="left context is unlimited"):
        ConformerStreamer(small, DynChunkTrainConfig(8, None))
    conmamba = _load("demo", tmp_path)["Transformer"]
    with pytest.raises(ValueError, match="not a Conformer encoder"):
        ConformerStreamer(conmamba, DynChunkTrainConfig(8, 4))


# --------------------------------------------------------------------------- recipe


def _batch(tokenizer) -> PaddedBatch:
    torch.manual_seed(2)
    words = ["A CAT", "THE DOG RAN"]
    return PaddedBatch([
        {"id": f"u{i}", "sig": torch.randn(8000 + 4000 * i) * 0.1, "wrd": wrd,
         "tokens": tokenizer.encode_sequence_torch(list(wrd))}
        for i, wrd in enumerate(words)
    ])


@pytest.mark.parametrize("name", ["conformer_streaming_demo", "demo"])
def test_recipe_passes_the_stage_config(name: str, tmp_path: Path, monkeypatch) -> None:
    """train_CTC: a DCT configuration's training step runs with the sampler's random chunk
    configuration and its evaluation with the fixed streaming one; a configuration without a
    sampler encodes with full context, as before."""
    argv = [str(CTC / f"{name}.yaml"), "--data_folder", str(tmp_path), "--output_folder",
            str(tmp_path / "out")]
    _, hparams, run_opts, _ = load_config(argv, train_CTC.KEYS)
    brain = train_CTC.build_brain(hparams, run_opts, None)
    seen: list[tuple[sb.Stage, DynChunkTrainConfig | None]] = []
    sampler = hparams.get("dynchunktrain_config_sampler")
    if sampler is not None:
        draw = DynChunkTrainConfig(12, 2)

        def spy(stage: sb.Stage) -> DynChunkTrainConfig | None:
            config = draw if stage == sb.Stage.TRAIN else sampler(stage)
            seen.append((stage, config))
            return config

        monkeypatch.setattr(brain.hparams, "dynchunktrain_config_sampler", spy)
    given: list[DynChunkTrainConfig | None] = []
    encoder = brain.modules.Transformer.encoder
    real = encoder.forward

    def record(*args, dynchunktrain_config=None, **kwargs):
        given.append(dynchunktrain_config)
        return real(*args, dynchunktrain_config=dynchunktrain_config, **kwargs)

    monkeypatch.setattr(encoder, "forward", record)
    batch = _batch(brain.tokenizer)
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    before = [p.detach().clone() for p in brain.modules.Transformer.parameters()]
    loss = brain.fit_batch(batch)
    assert torch.isfinite(loss) and brain.optimizer_step == 1
    assert any(not torch.equal(p, q) for p, q in
               zip(before, brain.modules.Transformer.parameters(), strict=True))
    brain.modules.eval()
    with torch.no_grad():
        for stage in (sb.Stage.VALID, sb.Stage.TEST):
            brain.compute_forward(batch, stage)
    if sampler is None:
        assert given == [None, None, None]
        return
    streaming = DynChunkTrainConfig(8, 4)
    assert seen == [(sb.Stage.TRAIN, draw), (sb.Stage.VALID, streaming),
                    (sb.Stage.TEST, streaming)]
    assert given == [draw, streaming, streaming]
    assert isinstance(encoder, ConformerEncoder)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_evaluates_exports_and_streams(demo_corpus: Path, tmp_path: Path) -> None:
    """A random-weight run of the demo configuration (zero learning rate): evaluate.py decodes
    its test set as its test stage did (the same hypotheses and loss: the streaming
    configuration); the exported folder keeps the model's streaming configuration,
    and ``Transcriber.stream()`` fed 10-ms to 2-s pieces gives the log-probabilities of the
    exported model's offline chunked pass (to 1e-4)."""
    import evaluate
    import export
    from mamba_asr.reports.curves import read_test_lines
    from mamba_asr.transcriber import Transcriber

    run = tmp_path / "run"
    train_CTC.main([
        str(CTC / "conformer_streaming_demo.yaml"), "--data_folder", str(demo_corpus),
        "--output_folder", str(run), "--select_n_sentences", "[8, 4, 8, 4]",
        "--number_of_epochs", "1", "--lr_model", "0.0", "--noprogressbar",
        "--test_dataloader_opts", "{batch_size: 1}",
    ])
    stats = evaluate.main([
        str(CTC / "conformer_streaming_demo.yaml"), "--ckpt", str(run / "save"), "--test_csv",
        str(run / "prepared" / "test-clean.csv"), "--out_dir", str(tmp_path / "eval"),
        "--test_dataloader_opts", "{batch_size: 1}", "--noprogressbar",
    ])
    assert stats["test-clean"]["utterances"] == 8
    run_hyps, eval_hyps = (
        {u["key"]: u["hyp_tokens"] for u in json.loads(
            (out / "wer_test-clean.json").read_text())["WER"]["utterances"]}
        for out in (run, tmp_path / "eval")
    )
    assert eval_hyps == run_hyps and len(run_hyps) == 8
    logged = read_test_lines(run / "train_log.txt").set_index("test set")
    assert stats["test-clean"]["loss"] == pytest.approx(logged.loc["test-clean", "test loss"],
                                                        rel=6e-3)  # logged to 3 digits
    folder = tmp_path / "export"
    export.main([str(run), "--out", str(folder)])
    assert "stream_chunk_size: 8" in (folder / "hyperparams.yaml").read_text()
    transcriber = Transcriber.from_folder(folder)
    h = transcriber.hparams
    assert h.Transformer.streaming_config == DynChunkTrainConfig(8, 4)
    wav = torch.randn(40000) * 0.05
    with torch.no_grad():
        feats = h.normalize(h.compute_features(wav[None]), torch.ones(1))
        enc = h.Transformer.encode(h.CNN(feats), torch.ones(1),
                                   dynchunktrain_config=h.Transformer.streaming_config)
        offline = h.log_softmax(h.ctc_lin(enc))[0]
    for piece in (160, 32000, 4410):
        stream = transcriber.stream()
        for lo in range(0, wav.numel(), piece):
            stream.feed(wav[lo : lo + piece])
        stream.finish()
        streamed = stream.log_probs()
        assert streamed.shape == offline.shape
        assert (streamed - offline).abs().max().item() <= 1e-4, piece
