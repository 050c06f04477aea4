"""ONNX export of CTC models: dynamic axes, parity with PyTorch eager, files, card, int8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
from mamba_asr import onnx_export
from mamba_asr.config import ConfigError
from mamba_asr.export import export_untrained
from mamba_asr.model_card import CARD_FILE, README_FILE, CardError, verify_folder
from mamba_asr.onnx_export import OnnxExportError, export_onnx, load_ctc
from mamba_asr.ort.transcriber import FEATURES_FILE, MODEL_FILE, TOKENS_FILE
from mamba_asr.ort.transcriber import QUANTIZED_FILE as INT8_FILE
from mamba_asr.transcriber import Transcriber, normalizer_lengths
from mamba_asr.transcribing import Piece

SAMPLE_RATE = 16000
ONNX_FILES = {FEATURES_FILE, MODEL_FILE, INT8_FILE, TOKENS_FILE}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo CTC model (random weights) exported, then the ONNX files added with int8."""
    out = tmp_path_factory.mktemp("onnx") / "demo-ctc"
    export_untrained("hparams/CTC/demo.yaml", out)
    export_onnx(out, quantize="int8")
    return out


@pytest.fixture(scope="module")
def asr(folder: Path):
    return load_ctc(folder)


@pytest.fixture(scope="module")
def sessions(folder: Path) -> dict[str, ort.InferenceSession]:
    return {name: ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
            for name in (FEATURES_FILE, MODEL_FILE, INT8_FILE)}


def waveforms(seconds: list[float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A zero-padded batch of noise waveforms (batch, samples) float32 and their lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.array([round(s * SAMPLE_RATE) for s in seconds], dtype=np.int64)
    wavs = np.zeros((len(seconds), lengths.max()), dtype=np.float32)
    for row, n in enumerate(lengths):
        wavs[row, :n] = 0.1 * rng.standard_normal(n)
    return wavs, lengths


def eager(asr, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """log-probs and lengths of the SpeechBrain modules in PyTorch eager mode, as the
    transcriber runs them (relative lengths)."""
    h = asr.hparams
    relative = lengths.float() / feats.shape[1]
    with torch.no_grad():
        normalised = h.normalize(feats, normalizer_lengths(lengths, feats.shape[1]))
        enc = h.Transformer.encode(h.CNN(normalised), relative)
        log_probs = h.log_softmax(h.ctc_lin(enc).float())
    return log_probs.numpy(), torch.round(relative * log_probs.shape[1]).long().numpy()


def run_model(session: ort.InferenceSession, feats: np.ndarray, lengths: np.ndarray):
    return session.run(None, {"features": feats, "feature_lengths": lengths})


def test_axes_are_dynamic(folder: Path, sessions: dict) -> None:
    for name, axis in ((MODEL_FILE, "frames"), (FEATURES_FILE, "samples")):
        first = onnx.load(str(folder / name)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in first[:2]] == ["batch", axis]
    for batch, frames in ((1, 57), (3, 411)):
        feats = np.random.default_rng(batch).standard_normal((batch, frames, 40), np.float32)
        lengths = np.array([frames - 20 * i for i in range(batch)], dtype=np.int64)
        log_probs, out_lengths = run_model(sessions[MODEL_FILE], feats, lengths)
        assert log_probs.shape == (batch, (frames + 3) // 4, 31)
        assert out_lengths.tolist() == np.round(lengths / frames * log_probs.shape[1]).tolist()
    for batch, seconds in ((1, 0.5), (2, 3.0)):
        wavs, lengths = waveforms([seconds] * batch)
        feats, feat_lengths = sessions[FEATURES_FILE].run(
            None, {"waveform": wavs, "waveform_lengths": lengths})
        assert feats.shape == (batch, wavs.shape[1] // 160 + 1, 40)


def test_features_match_speechbrain_fbank(asr, sessions: dict) -> None:
    """Each row's valid frames are those of its waveform alone in SpeechBrain's Fbank."""
    wavs, lengths = waveforms([2.0, 1.234])
    feats, feat_lengths = sessions[FEATURES_FILE].run(
        None, {"waveform": wavs, "waveform_lengths": lengths})
    assert feats.dtype == np.float32 and feat_lengths.dtype == np.int64
    for row, n in enumerate(lengths):
        with torch.no_grad():
            alone = asr.hparams.compute_features(torch.from_numpy(wavs[row:row + 1, :n]))[0]
        assert feat_lengths[row] == alone.shape[0] == n // 160 + 1
        assert np.abs(feats[row, : feat_lengths[row]] - alone.numpy()).max() <= 1e-4


@pytest.mark.parametrize("seconds", [1, 17, 120])  # 120 s: 12001 frames, the windowed statistics
def test_log_probs_match_eager(asr, sessions: dict, seconds: int) -> None:
    wavs, lengths = waveforms([seconds], seed=seconds)
    feats, feat_lengths = sessions[FEATURES_FILE].run(
        None, {"waveform": wavs, "waveform_lengths": lengths})
    log_probs, out_lengths = run_model(sessions[MODEL_FILE], feats, feat_lengths)
    ref, ref_lengths = eager(asr, torch.from_numpy(feats), torch.from_numpy(feat_lengths))
    assert log_probs.shape == ref.shape and log_probs.shape[1] == out_lengths[0]
    assert np.abs(log_probs - ref).max() <= 1e-4
    assert out_lengths.tolist() == ref_lengths.tolist()
    # and the whole chain against SpeechBrain's EncoderASR on the waveform
    with torch.no_grad():
        whole = asr.encode_batch(torch.from_numpy(wavs), torch.ones(1)).numpy()
    assert np.abs(log_probs - whole).max() <= 1e-4


def test_padded_batch_matches_eager(asr, sessions: dict) -> None:
    """Rows of 34 s (windowed statistics), 20 s and 1.5 s in one padded batch."""
    rng = np.random.default_rng(3)
    lengths = np.array([3401, 2001, 151], dtype=np.int64)
    feats = (5 + 3 * rng.standard_normal((3, 3401, 40))).astype(np.float32)
    feats[np.arange(3401)[None, :] >= lengths[:, None]] = 0.0
    log_probs, out_lengths = run_model(sessions[MODEL_FILE], feats, lengths)
    ref, ref_lengths = eager(asr, torch.from_numpy(feats), torch.from_numpy(lengths))
    assert out_lengths.tolist() == ref_lengths.tolist() == [851, 501, 38]
    for row, n in enumerate(out_lengths):
        assert np.abs(log_probs[row, :n] - ref[row, :n]).max() <= 1e-4


def test_normalizer_lengths_count_each_rows_frames() -> None:
    """SpeechBrain's padding mask counts exactly each row's frames for every row length of
    batches up to 400 frames (frames / total does not: 120 / 215 counts 121)."""
    from speechbrain.processing.features import make_padding_mask

    for total in range(1, 401):
        frames = torch.arange(1, total + 1)
        mask = make_padding_mask(torch.zeros(total, total), normalizer_lengths(frames, total))
        assert mask.sum(1).tolist() == frames.tolist(), total


def test_transcriber_padded_batch_is_onnxruntimes(folder: Path, sessions: dict,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch backend's log-probabilities of a padded batch are onnxruntime's, row by row:
    a row of 120 feature frames beside one of 215, where relative lengths made SpeechBrain's
    normaliser take the first padding frame into the short row's statistics."""
    wavs, lengths = waveforms([119 * 160 / SAMPLE_RATE, 214 * 160 / SAMPLE_RATE], seed=5)
    asr = Transcriber.from_folder(folder, search="greedy")
    seen: list[np.ndarray] = []
    monkeypatch.setattr(asr, "_ctc_words", lambda lp, offset: seen.append(lp.numpy()) or [])
    asr._transcribe_batch([Piece(row, torch.from_numpy(wavs[row, :n]), 0.0)
                           for row, n in enumerate(lengths)])
    feats, feat_lengths = sessions[FEATURES_FILE].run(
        None, {"waveform": wavs, "waveform_lengths": lengths})
    assert feat_lengths.tolist() == [120, 215]
    log_probs, out_lengths = run_model(sessions[MODEL_FILE], feats, feat_lengths)
    assert [len(lp) for lp in seen] == out_lengths.tolist() == [30, 54]
    for row, n in enumerate(out_lengths):
        assert np.abs(seen[row] - log_probs[row, :n]).max() <= 1e-4


def test_tokens_file(folder: Path, asr) -> None:
    lines = (folder / TOKENS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 31
    assert lines[:6] == ["<blk> 0", "<bos> 1", "<eos> 2", "\u2581 3", "' 4", "A 5"]
    assert lines[-1] == "Z 30"
    labels = asr.tokenizer.ind2lab
    assert [line.split(" ")[1] for line in lines] == [str(i) for i in range(31)]
    assert all(line.split(" ")[0] == labels[i] for i, line in enumerate(lines) if i > 3)


def test_metadata(folder: Path) -> None:
    props = {p.key: p.value for p in onnx.load(str(folder / MODEL_FILE)).metadata_props}
    assert props == {
        "model_type": "conmamba_ctc", "version": "1", "vocab_size": "31", "blank_id": "0",
        "word_separator": "\u2581", "subsampling_factor": "4", "sample_rate": "16000",
        "feature_dim": "40", "frame_shift_ms": "10", "output_frame_seconds": "0.04",
        "normalize": "windowed:3000", "tokens": TOKENS_FILE,
    }
    assert len(onnx.load(str(folder / MODEL_FILE)).graph.initializer) > 0  # weights inside


def test_card_lists_and_verifies_the_files(folder: Path, tmp_path: Path) -> None:
    card = verify_folder(folder)
    assert ONNX_FILES <= set(card["files"])
    assert set(card["files"]) == {p.name for p in folder.iterdir()} - {CARD_FILE}
    assert json.loads((folder / CARD_FILE).read_text())["files"] == card["files"]
    readme = (folder / README_FILE).read_text(encoding="utf-8")
    assert all(f"`{name}`" in readme for name in ONNX_FILES)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / MODEL_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CardError, match="model.onnx"):
        verify_folder(copy)


def test_int8_model_runs_close_to_fp32(folder: Path, sessions: dict) -> None:
    assert (folder / INT8_FILE).stat().st_size < 0.5 * (folder / MODEL_FILE).stat().st_size
    ops = {n.op_type for n in onnx.load(str(folder / INT8_FILE)).graph.node}
    assert "DynamicQuantizeLinear" in ops
    wavs, lengths = waveforms([17.0], seed=17)
    feats, feat_lengths = sessions[FEATURES_FILE].run(
        None, {"waveform": wavs, "waveform_lengths": lengths})
    fp32, _ = run_model(sessions[MODEL_FILE], feats, feat_lengths)
    int8, int8_lengths = run_model(sessions[INT8_FILE], feats, feat_lengths)
    assert int8.shape == fp32.shape and int8_lengths.tolist() == [fp32.shape[1]]
    assert np.abs(int8 - fp32).max() > 1e-4  # quantised, not a copy
    assert (int8.argmax(-1) == fp32.argmax(-1)).mean() >= 0.85


def test_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OnnxExportError, match="ONNX export of LM models: expected a CTC or S2S"):
        onnx_export.check_request("LM", None)
    with pytest.raises(ConfigError, match="--format onnx"):
        export.main(["hparams/CTC/demo.yaml", "--ckpt", str(tmp_path), "--out",
                     str(tmp_path / "x"), "--quantize", "int8"])
    with pytest.raises(OnnxExportError, match="'int4'"):
        onnx_export.check_request("CTC", "int4")

    # an ONNX export that fails leaves no folder and no temporary behind
    def fail(stage: Path, family: str, quantize: str | None) -> list[str]:
        (stage / MODEL_FILE).write_bytes(b"partial")
        raise OnnxExportError("exporter refused")

    monkeypatch.setattr(onnx_export, "write_onnx_files", fail)
    with pytest.raises(OnnxExportError, match="exporter refused"):
        export_untrained("hparams/CTC/demo.yaml", tmp_path / "m", onnx=True)
    assert [p.name for p in tmp_path.iterdir()] == []


def greedy_text(log_probs: np.ndarray, tokens: dict[int, str]) -> str:
    """CTC greedy decoding with tokens.txt's symbols (``▁`` a space, ``<...>`` dropped)."""
    best = log_probs.argmax(-1)
    ids = [t for i, t in enumerate(best) if (i == 0 or t != best[i - 1]) and t != 0]
    symbols = [tokens[t] for t in ids if not tokens[t].startswith("<")]
    return "".join(symbols).replace("\u2581", " ")


@pytest.mark.slow
def test_export_py_format_onnx_transcribes_as_eager(ctc_graph_export: Path,
                                                    demo_corpus: Path) -> None:
    """export.py's --format onnx on a run folder: a verified folder whose ONNX files give the
    transcriber's (eager) transcripts of demo utterances, greedy CTC."""
    import soundfile as sf

    from mamba_asr.transcriber import Transcriber

    out = ctc_graph_export
    assert ONNX_FILES <= set(verify_folder(out)["files"])
    tokens = {int(i): s for s, i in (line.split(" ") for line in
                                     (out / TOKENS_FILE).read_text(encoding="utf-8").splitlines())}
    features = ort.InferenceSession(str(out / FEATURES_FILE))
    model = ort.InferenceSession(str(out / MODEL_FILE))
    asr = Transcriber.from_folder(out, search="greedy")
    flacs = sorted((demo_corpus / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))[:3]
    for flac in flacs:
        wav, _ = sf.read(flac, dtype="float32")
        feats, lengths = features.run(None, {"waveform": wav[None],
                                             "waveform_lengths": np.array([len(wav)])})
        log_probs, _ = run_model(model, feats, lengths)
        expected = asr.transcribe_file(flac).text
        assert len(expected) > 10  # random weights: long strings of characters
        assert greedy_text(log_probs[0], tokens).split() == expected.split()
