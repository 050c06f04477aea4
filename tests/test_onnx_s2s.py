"""ONNX export of S2S models: the encoder, the Mamba decoder's state graphs, the Transformer
decoder's prefix graph and the LM against PyTorch eager, on random-weight tiny models."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mamba_asr.export import ExportError, export_untrained
from mamba_asr.model_card import verify_folder
from mamba_asr.onnx_export import _to_onnx
from mamba_asr.onnx_s2s import load_s2s, s2s_graphs
from mamba_asr.ort.s2s import (
    DECODER_INIT_FILE,
    DECODER_STEP_FILE,
    DECODER_STEP_INT8_FILE,
    ENCODER_FILE,
    ENCODER_INT8_FILE,
    LM_FILE,
    LMStepDecoder,
    MambaStepDecoder,
    TransformerStepDecoder,
)
from mamba_asr.ort.transcriber import FEATURES_FILE, TOKENS_FILE
from mamba_asr.tokenizer import prepare_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
BOS = 1
# 1 encoder layer, 2 decoder layers (the stacked states' order matters), a small LM
TINY = ["--num_encoder_layers", "1", "--num_decoder_layers", "2", "--d_ffn", "256",
        "--test_beam_size", "3"]
CONFORMER_TINY = [*TINY, "--output_neurons", "256", "--d_model", "64"]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tokenizer(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256-piece SentencePiece model of the demo training transcripts."""
    folder = tmp_path_factory.mktemp("spm")
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "wrd"])
        for trans in sorted((demo_corpus / "LibriSpeech" / "train-clean-100").glob("*/*/*.txt")):
            for line in trans.read_text(encoding="utf-8").splitlines():
                writer.writerow(line.split(" ", 1))
    prepare_tokenizer(folder / "spm", 256, folder / "train.csv")
    return folder / "spm" / "256_unigram.model"


def export_random(config: str, out: Path, overrides: list[str], **options) -> Path:
    export_untrained(config, out, overrides=overrides, **options)
    return out


def write_graphs(asr, out: Path, names: set[str]) -> Path:
    """The graphs ``names`` of the folder's model written to ``out`` (not the whole export:
    the features graph and the quantised copies are the CTC tests' and the slow test's)."""
    out.mkdir()
    for graph in s2s_graphs(asr):
        if graph.name in names:
            onnx.save_model(_to_onnx(graph), out / f"{graph.name}.onnx")
    return out


@pytest.fixture(scope="module")
def s2s_export(tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random demo S2S model (with its LM) exported with all ONNX files, int8 and
    the pt2 programs."""
    out = tmp_path_factory.mktemp("onnx_s2s") / "demo-s2s"
    return export_random("hparams/S2S/demo.yaml", out,
                         [*TINY, "--pretrained_tokenizer_path", str(tokenizer)],
                         onnx=True, quantize="int8", pt2=True)


@pytest.fixture(scope="module")
def mamba_asr(s2s_export: Path):
    """The exported model (ConMamba + Mamba decoder + Transformer LM) loaded as SpeechBrain's
    EncoderDecoderASR."""
    return load_s2s(s2s_export)


@pytest.fixture(scope="module")
def mamba_folder(s2s_export: Path) -> Path:
    """The folder of its encoder, decoder_init, decoder_step and lm graphs."""
    return s2s_export


@pytest.fixture(scope="module")
def transformer_asr(tokenizer: Path, tmp_path_factory: pytest.TempPathFactory):
    """Conformer-S with its Transformer decoder, tiny, random, without LM."""
    out = tmp_path_factory.mktemp("onnx_s2s") / "conformer-s2s"
    return load_s2s(export_random(
        "hparams/S2S/conformer_small.yaml", out,
        [*CONFORMER_TINY, "--pretrained_tokenizer_path", str(tokenizer)], no_lm=True))


def padded_features(frames: list[int], n_mels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.array(frames, dtype=np.int64)
    feats = (3 + 2 * rng.standard_normal((len(frames), max(frames), n_mels))).astype(np.float32)
    feats[np.arange(max(frames))[None, :] >= lengths[:, None]] = 0.0
    return feats, lengths


def eager_encoder(asr, feats: np.ndarray, lengths: np.ndarray):
    """encoder_out, ctc log-probs and lengths as the torch transcriber computes them."""
    h = asr.hparams
    x = torch.from_numpy(feats)
    relative = torch.from_numpy(lengths).float() / x.shape[1]
    with torch.no_grad():
        enc = h.Transformer.encode(h.CNN(h.normalize(x, relative)), relative)
        log_probs = h.log_softmax(h.ctc_lin(enc).float())
    return enc, log_probs.numpy(), torch.round(relative * enc.shape[1]).long()


def run_encoder(folder: Path, feats: np.ndarray, lengths: np.ndarray, file: str = ENCODER_FILE):
    return session(folder / file).run(None, {"features": feats, "feature_lengths": lengths})


@pytest.mark.parametrize("frames", [[101], [1701], [1701, 1200, 150]])
def test_encoder_matches_eager(mamba_folder: Path, mamba_asr, frames: list[int]) -> None:
    """1 s, 17 s, and a padded batch: each row's valid frames as eager."""
    feats, lengths = padded_features(frames, 40, seed=len(frames) + frames[0])
    enc, enc_lengths, log_probs = run_encoder(mamba_folder, feats, lengths)
    ref_enc, ref_log_probs, ref_lengths = eager_encoder(mamba_asr, feats, lengths)
    assert enc_lengths.dtype == np.int64 and enc_lengths.tolist() == ref_lengths.tolist()
    assert enc.shape == ref_enc.shape and log_probs.shape == ref_log_probs.shape
    for row, n in enumerate(enc_lengths):
        assert np.abs(enc[row, :n] - ref_enc[row, :n].numpy()).max() <= TOL
        assert np.abs(log_probs[row, :n] - ref_log_probs[row, :n]).max() <= TOL


def encoder_memory(asr, frames: list[int]) -> tuple[np.ndarray, np.ndarray]:
    feats, lengths = padded_features(frames, 40, seed=7)
    enc, _, enc_lengths = eager_encoder(asr, feats, lengths)
    return enc.numpy(), enc_lengths.numpy()


def eager_logits(asr, prefix: np.ndarray, enc: np.ndarray, enc_lengths: np.ndarray):
    """(N, t, vocab): the output layer over ``decode`` of the whole prefix."""
    h = asr.hparams
    with torch.no_grad():
        pred, _ = h.Transformer.decode(torch.from_numpy(prefix), torch.from_numpy(enc),
                                       torch.from_numpy(enc_lengths))
        return h.seq_lin(pred).numpy()


def random_prefix(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(3, vocab, (batch, length))
    tokens[:, 0] = BOS
    return tokens


def test_mamba_decoder_steps_match_decode(mamba_folder: Path, mamba_asr) -> None:
    """20 steps through decoder_init/decoder_step equal decode of the whole prefix and
    decode_step, for a padded batch of encoder outputs, after a beam reorder."""
    h = mamba_asr.hparams
    enc, enc_lengths = encoder_memory(mamba_asr, [801, 430])
    assert enc_lengths.tolist() == [201, 108]
    prefix = random_prefix(2, 20, 256, seed=1)
    ref = eager_logits(mamba_asr, prefix, enc, enc_lengths)
    decoder = MambaStepDecoder(session(mamba_folder / DECODER_INIT_FILE),
                               session(mamba_folder / DECODER_STEP_FILE))
    state = decoder.init(enc, enc_lengths)
    assert state[0].shape[:2] == state[1].shape[:2] == (4, 2)  # 2 layers x (self, cross)
    # [layer0.self, layer0.cross, ...]: the self Mambas start from zeros, the cross Mambas
    # from each item's valid encoder frames
    for layer in range(2):
        assert not state[0][2 * layer].any() and not state[1][2 * layer].any()
        assert state[0][2 * layer + 1].any() and state[1][2 * layer + 1].any()
    eager_state = h.Transformer.init_decoder_state(torch.from_numpy(enc),
                                                   torch.from_numpy(enc_lengths))
    for t in range(prefix.shape[1]):
        logits, state = decoder.step(prefix[:, : t + 1], state)
        assert logits.shape == (2, 256)
        assert np.abs(logits - ref[:, t]).max() <= TOL, t
        pred, eager_state = h.Transformer.decode_step(torch.from_numpy(prefix[:, t]), t,
                                                      eager_state)
        assert np.abs(logits - h.seq_lin(pred)[:, 0].detach().numpy()).max() <= TOL, t
    # beams: item 1 twice, then item 0; one more step continues each one's prefix
    index = np.array([1, 1, 0])
    state = decoder.reorder(state, index)
    longer = np.concatenate([prefix[index], np.array([[5], [6], [7]])], axis=1)
    logits, _ = decoder.step(longer, state)
    expected = eager_logits(mamba_asr, longer, enc[index], enc_lengths[index])[:, -1]
    assert np.abs(logits - expected).max() <= TOL


def test_lm_matches_eager(mamba_folder: Path, mamba_asr) -> None:
    lm = LMStepDecoder(session(mamba_folder / LM_FILE))
    for length in (1, 9):
        prefix = random_prefix(3, length, 256, seed=length)
        logits, _ = lm.step(prefix, lm.init(np.zeros((3, 1, 1)), np.ones(3)))
        with torch.no_grad():
            ref = mamba_asr.hparams.lm_model(torch.from_numpy(prefix))[:, -1].numpy()
        assert logits.shape == (3, 256)
        assert np.abs(logits - ref).max() <= TOL


def test_transformer_decoder_prefix_matches_decode(transformer_asr, tmp_path: Path) -> None:
    """decoder_step.onnx of a Transformer decoder: prefixes of 1, 2 and 12 tokens over a
    padded batch of encoder outputs, and after a beam reorder, as eager decode."""
    graphs = {g.name: g for g in s2s_graphs(transformer_asr)}
    assert set(graphs) == {"features", "encoder", "decoder_step"}  # no state graph, no LM
    meta = graphs["encoder"].metadata
    assert (meta["model_type"], meta["decoder_type"], meta["has_lm"], meta["lm_weight"]) == \
        ("conformer_transformer_s2s", "transformer", "0", "0.0")
    folder = write_graphs(transformer_asr, tmp_path / "graphs", {"decoder_step"})
    feats, lengths = padded_features([801, 430], 80, seed=5)
    enc, _, enc_lengths = eager_encoder(transformer_asr, feats, lengths)
    enc, enc_lengths = enc.numpy(), enc_lengths.numpy()
    decoder = TransformerStepDecoder(session(folder / DECODER_STEP_FILE))
    state = decoder.init(enc, enc_lengths)
    prefix = random_prefix(2, 12, 256, seed=2)
    ref = eager_logits(transformer_asr, prefix, enc, enc_lengths)
    for t in (0, 1, 11):
        logits, state = decoder.step(prefix[:, : t + 1], state)
        assert np.abs(logits - ref[:, t]).max() <= TOL, t
    index = np.array([1, 0, 0])
    logits, _ = decoder.step(prefix[index], decoder.reorder(state, index))
    assert np.abs(logits - ref[index, -1]).max() <= TOL


def test_metadata_is_the_test_search(mamba_folder: Path, mamba_asr) -> None:
    props = {p.key: p.value for p in onnx.load(str(mamba_folder / ENCODER_FILE)).metadata_props}
    assert props == {
        "model_type": "conmamba_mamba_s2s", "version": "1", "vocab_size": "256",
        "blank_id": "0", "word_separator": "\u2581", "subsampling_factor": "4",
        "sample_rate": "16000", "feature_dim": "40", "frame_shift_ms": "10",
        "output_frame_seconds": "0.04", "normalize": "windowed:3000", "tokens": TOKENS_FILE,
        "decoder_type": "mamba", "bos_id": "1", "eos_id": "2", "beam_size": "3",
        "ctc_weight": "0.4", "lm_weight": "0.15", "temperature": "1.15",
        "lm_temperature": "1.15", "min_decode_ratio": "0.0", "max_decode_ratio": "1.0",
        "length_normalization": "1", "using_eos_threshold": "0", "eos_threshold": "1.5",
        "using_max_attn_shift": "0", "max_attn_shift": "60", "ctc_window_size": "0",
        "has_lm": "1",
    }
    searcher = mamba_asr.mods.decoder
    assert (searcher.beam_size, searcher.ctc_weight, searcher.temperature) == (3, 0.4, 1.15)


def test_untrained_s2s_needs_a_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--pretrained_tokenizer_path"):
        export_untrained("hparams/S2S/demo.yaml", tmp_path / "x", overrides=TINY)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_pt2_programs_are_the_onnx_graphs(s2s_export: Path) -> None:
    """Each S2S graph's torch.export program (torch.export.load) gives its ONNX graph's
    outputs, fed one after the other as a search feeds them, at a new batch size."""
    feats, lengths = padded_features([301, 170, 45], 40, seed=3)
    tokens = np.array([[1, 7, 9, 4], [1, 3, 3, 8], [1, 250, 5, 2]], dtype=np.int64)
    feeds: dict[str, np.ndarray] = {"features": feats, "feature_lengths": lengths}
    for name in ("encoder", "decoder_init", "decoder_step", "lm"):
        if name == "decoder_step":
            feeds.update(tokens=tokens[:, -1], position=np.full(3, 3, dtype=np.int64))
        elif name == "lm":
            feeds["tokens"] = tokens
        sess = session(s2s_export / f"{name}.onnx")
        inputs = {i.name: feeds[i.name] for i in sess.get_inputs()}
        expected = sess.run(None, inputs)
        program = torch.export.load(str(s2s_export / f"{name}.pt2")).module()
        with torch.no_grad():
            got = program(*(torch.from_numpy(inputs[i.name]) for i in sess.get_inputs()))
        got = got if isinstance(got, tuple | list) else (got,)
        assert len(got) == len(expected)
        for out, ours, theirs in zip(sess.get_outputs(), got, expected, strict=True):
            np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4, err_msg=name)
            feeds[out.name] = theirs


@pytest.mark.slow
def test_export_files_tokens_and_int8(s2s_export: Path, tokenizer: Path) -> None:
    files = {FEATURES_FILE, ENCODER_FILE, ENCODER_INT8_FILE, DECODER_INIT_FILE,
             DECODER_STEP_FILE, DECODER_STEP_INT8_FILE, LM_FILE, TOKENS_FILE,
             "features.pt2", "encoder.pt2", "decoder_init.pt2", "decoder_step.pt2", "lm.pt2"}
    assert files <= set(verify_folder(s2s_export)["files"])
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    lines = (s2s_export / TOKENS_FILE).read_text(encoding="utf-8").splitlines()
    assert lines[:3] == ["<blk> 0", "<s> 1", "</s> 2"]
    assert lines[3:] == [f"{sp.id_to_piece(i)} {i}" for i in range(3, 256)]
    assert any(line.startswith("\u2581") for line in lines)
    feats, lengths = padded_features([501], 40, seed=9)
    fp32 = run_encoder(s2s_export, feats, lengths)[2]
    int8 = run_encoder(s2s_export, feats, lengths, ENCODER_INT8_FILE)[2]
    assert 1e-4 < np.abs(int8 - fp32).max()  # quantised, not a copy
    for name in (ENCODER_FILE, DECODER_STEP_FILE):
        int8_size = (s2s_export / name.replace(".onnx", ".int8.onnx")).stat().st_size
        assert int8_size < 0.6 * (s2s_export / name).stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("no_lm", [True, False])
def test_onnxruntime_transcribes_as_torch(s2s_export: Path, demo_corpus: Path,
                                          no_lm: bool) -> None:
    """OnnxTranscriber on the S2S folder: the torch backend's transcripts and word times, in a
    padded batch and one file a batch, without and with the LM; and transcribe.py
    --backend onnxruntime on it in a process without torch."""
    from test_ort_runtime import _run_isolated

    from mamba_asr.ort.s2s_transcriber import OnnxS2STranscriber
    from mamba_asr.ort.transcriber import OnnxTranscriber
    from mamba_asr.transcriber import Transcriber

    files = sorted((demo_corpus / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))[:4]
    for options in ({}, {"max_batch_seconds": 1e-3}):
        torch_asr = Transcriber.from_folder(s2s_export, no_lm=no_lm, **options)
        onnx_asr = OnnxTranscriber.from_folder(s2s_export, no_lm=no_lm, **options)
        assert isinstance(onnx_asr, OnnxS2STranscriber)
        assert (onnx_asr.lm is None) == no_lm
        for ours, theirs in zip(onnx_asr.transcribe(files), torch_asr.transcribe(files),
                                strict=True):
            assert len(theirs.words) > 5  # random weights: long hypotheses
            assert ours.text == theirs.text
            times = [(w.start, w.end) for w in theirs.words]
            np.testing.assert_allclose([(w.start, w.end) for w in ours.words], times, atol=1e-6)
    if no_lm:
        return
    proc, imported = _run_isolated([str(s2s_export), str(files[0]), "--backend",
                                    "onnxruntime"], REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert imported == []
    assert json.loads(proc.stdout)["text"] == next(torch_asr.transcribe(files[:1])).text


@pytest.mark.slow
def test_onnxruntime_options_int8_and_missing_lm(s2s_export: Path, demo_corpus: Path,
                                                  tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The int8 graphs transcribe; greedy search is refused as by the torch backend; a folder
    (without a card) whose lm.onnx is missing decodes without the LM and says so once."""
    from mamba_asr.ort.s2s_transcriber import OnnxS2STranscriber
    from mamba_asr.ort.transcriber import OnnxTranscriber

    files = sorted((demo_corpus / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))[:1]
    int8 = OnnxTranscriber.from_folder(s2s_export, quantized=True, beam_size=2)
    assert int8.options.beam_size == 2 and int8.encoder.get_inputs()[0].name == "features"
    assert len(next(int8.transcribe(files)).words) > 5
    with pytest.raises(ValueError, match="S2S models decode by beam search only"):
        OnnxTranscriber.from_folder(s2s_export, search="greedy")
    copy = tmp_path / "copy"
    shutil.copytree(s2s_export, copy)
    (copy / LM_FILE).unlink()
    (copy / "model_card.json").unlink()
    with caplog.at_level(logging.WARNING):
        asr = OnnxTranscriber.from_folder(copy)
    assert isinstance(asr, OnnxS2STranscriber) and asr.lm is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{copy}: no {LM_FILE}; decoding without the model's LM"]
