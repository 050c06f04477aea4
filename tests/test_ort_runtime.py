"""The PyTorch-free runtime (mamba_asr.ort) against the torch path it replaces: CTC decoding
and alignment, voice-activity segments, audio loading, and no torch in its process."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import ort_models
import pytest
import soundfile as sf
import torch
import torchaudio.functional as taf
from conftest import DEMO_DATA, REPO
from speechbrain.decoders.ctc import CTCPrefixBeamSearcher, ctc_greedy_decode

from mamba_asr import alignment, audio_io, vad, vad_segments
from mamba_asr.audio_files import AudioError
from mamba_asr.ctc_words import word_targets
from mamba_asr.model_card import CARD_VERSION, CardError, sha256_file
from mamba_asr.ort import audio as ort_audio
from mamba_asr.ort import ctc
from mamba_asr.ort import vad as ort_vad
from mamba_asr.ort.transcriber import OnnxTranscriber

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


def test_forced_align_long_targets_match_torchaudio() -> None:
    """Hundreds of CTC states (more than the int8 back-pointers' range)."""
    lp = peaky_log_probs(600, frames=500)
    targets = np.random.default_rng(600).integers(1, len(CHARS), 150).tolist()
    path, _ = taf.forced_align(torch.from_numpy(lp)[None],
                               torch.tensor([targets], dtype=torch.int32), blank=BLANK)
    np.testing.assert_array_equal(ctc.forced_align(lp, targets, BLANK), path[0].numpy())


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


# --------------------------------------------------------------------------- VAD

def _speech_and_silence() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Demo test utterances with 1.5 s silences and a 0.2 s gap between them (16 kHz), and
    where the silences are."""
    files = sorted((DEMO_DATA / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))[:4]
    if len(files) < 4:
        pytest.skip(f"the demo corpus is not generated ({DEMO_DATA})")
    silence, gap = np.zeros(24000, np.float32), np.zeros(3200, np.float32)
    utterances = [sf.read(f, dtype="float32")[0] for f in files]
    pieces = [silence, utterances[0], gap, utterances[1], silence, utterances[2], silence,
              utterances[3], silence]
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    silences = [(0, ends[0]), (ends[3], ends[4]), (ends[5], ends[6]), (ends[7], ends[8])]
    return np.concatenate(pieces), silences


def test_speech_regions_are_silero_rules() -> None:
    """The region rules written out give silero-vad's own regions on the same probabilities:
    runs of 1 to 15 frames of speech, silence or in-between levels."""
    from silero_vad import get_speech_timestamps_from_probs

    rng = np.random.default_rng(11)
    levels = [(0.5, 1.0), (0.0, 0.35), (0.35, 0.5)]  # speech, silence, neither
    counts = []
    for trial in range(20):
        runs = [np.full(rng.integers(1, 16), rng.uniform(*levels[rng.integers(0, 3)]))
                for _ in range(60)]
        probs = np.concatenate(runs).astype(np.float32)
        n = len(probs) * 512 - int(rng.integers(0, 511))
        options = {"threshold": 0.5, "min_silence_ms": [100, 300][trial // 2 % 2],
                   "pad_ms": [30, 200][trial % 2]}
        expected = get_speech_timestamps_from_probs(
            probs.tolist(), sampling_rate=16000, threshold=options["threshold"],
            min_silence_duration_ms=options["min_silence_ms"],
            speech_pad_ms=options["pad_ms"], audio_length_samples=n)
        assert vad_segments.speech_regions(probs, 16000, n, **options) == expected
        counts.append(len(expected))
    assert min(counts) >= 2 and max(counts) >= 5


def test_vad_probabilities_match_the_torch_model() -> None:
    wav, _ = _speech_and_silence()
    expected = vad.vad_model().audio_forward(torch.from_numpy(wav)[None], 16000)[0].numpy()
    ours = ort_vad.speech_probabilities(wav, 16000)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=2e-3)
    assert expected.max() > 0.9 and expected.min() < 0.1  # speech and silence


@pytest.mark.parametrize("rate", [16000, 44100])
def test_vad_segments_match_the_torch_path_within_a_frame(rate: int) -> None:
    wav, silences = _speech_and_silence()
    if rate != 16000:
        wav = taf.resample(torch.from_numpy(wav), 16000, rate).numpy()
        silences = [(a * rate // 16000, b * rate // 16000) for a, b in silences]
    frame = 512 * rate // 16000
    for max_seconds in (30.0, 2.5):  # 2.5 s: the longer utterances are cut
        expected = vad.speech_segments(torch.from_numpy(wav), rate, max_seconds)
        ours = ort_vad.speech_segments(wav, rate, max_seconds)
        assert len(ours) == len(expected) >= len(silences) - 1
        np.testing.assert_allclose(np.array(ours), np.array(expected), atol=frame)
    for start, end in silences:  # the middle of a long silence is no segment's
        middle = (start + end) // 2
        assert not any(a <= middle < b for a, b in ours)


def test_vad_model_found_without_importing_the_package() -> None:
    code = ("import sys; from mamba_asr.ort import vad; print(vad.model_path().name); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'silero_vad', 'speechbrain', 'torchaudio')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split("\n")
    assert out[:2] == ["silero_vad.onnx", "[]"]


def test_vad_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"float array \(samples,\), got \(1, 16000\)"):
        ort_vad.speech_segments(np.zeros((1, 16000), np.float32), 16000, 10.0)
    with pytest.raises(ValueError, match="max_seconds must be a positive number.*got 0"):
        ort_vad.speech_segments(np.zeros(16000, np.float32), 16000, 0)
    assert ort_vad.speech_segments(np.zeros(100, np.float32), 16000, 10.0) == []


# --------------------------------------------------------------------------- audio

def test_load_audio_matches_audio_io(tmp_path: Path) -> None:
    t = np.arange(22050) / 22050
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 97 * t)], 1)
    sf.write(tmp_path / "native.wav", stereo, 16000, subtype="PCM_16")
    sf.write(tmp_path / "cd.flac", stereo, 22050, subtype="PCM_16")
    native = ort_audio.load_audio(tmp_path / "native.wav", 16000)
    assert native.dtype == np.float32
    np.testing.assert_array_equal(native, audio_io.load_audio(tmp_path / "native.wav",
                                                              16000).numpy())
    ours = ort_audio.load_audio(tmp_path / "cd.flac", 16000)
    expected = audio_io.load_audio(tmp_path / "cd.flac", 16000).numpy()
    assert ours.shape == expected.shape == (16000,)
    inner = slice(200, -200)  # the filters differ at the edges
    assert np.abs(ours[inner] - expected[inner]).max() < 0.01


def test_load_audio_errors_match_audio_io(tmp_path: Path) -> None:
    (tmp_path / "notes.wav").write_text("not audio at all\n")
    (tmp_path / "empty.wav").write_bytes(b"")
    for name in ("notes.wav", "empty.wav", "missing.wav"):
        with pytest.raises(AudioError) as torch_error:
            audio_io.load_audio(tmp_path / name, 16000)
        with pytest.raises(AudioError) as ours:
            ort_audio.load_audio(tmp_path / name, 16000)
        assert str(ours.value) == str(torch_error.value)


def test_prepare_waveform_matches_audio_io() -> None:
    pcm = (np.random.default_rng(0).normal(0, 3000, (8000, 2))).astype(np.int16)
    np.testing.assert_allclose(ort_audio.prepare_waveform(pcm, 16000, 16000),
                               audio_io.prepare_waveform(pcm, 16000, 16000).numpy(), atol=1e-7)
    for bad, reason in [(np.zeros((2, 8000), np.float32), "more channels than samples"),
                        (np.array([0.0, np.nan], np.float32), "NaN or infinite"),
                        (np.zeros(10, np.complex64), "samples of type complex64")]:
        with pytest.raises(AudioError, match=reason):
            ort_audio.prepare_waveform(bad, 16000, 16000)


# --------------------------------------------------------------------------- transcriber

BANNED = ("torch", "torchaudio", "speechbrain", "modules", "silero_vad")


@pytest.fixture(scope="module")
def level_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ort_models.write_level_model(tmp_path_factory.mktemp("onnx") / "level-ctc")


def _close_words(words: list, expected: list[tuple[str, float, float]]) -> None:
    assert [w.word for w in words] == [e[0] for e in expected]
    frame = ort_models.FRAME_SECONDS
    for w, (_, start, end) in zip(words, expected, strict=True):
        assert abs(w.start - start) <= frame + 1e-9 and abs(w.end - end) <= frame + 1e-9
        assert w.probability > 0.9


def test_onnx_transcriber_batches_and_one_pass(level_model: Path, tmp_path: Path) -> None:
    texts = ["AB BA", "B", "AAB BAB A", "ABBA AB"]
    clips = [ort_models.spell(text) for text in texts]
    sf.write(tmp_path / "long.flac", np.tile(clips[0][0], 50), ort_models.RATE)  # 75 s
    asr = OnnxTranscriber.from_folder(level_model, max_batch_seconds=4.0)
    inputs = [(wav, ort_models.RATE) for wav, _ in clips] + [tmp_path / "long.flac"]
    transcripts = list(asr.transcribe(inputs))
    for t, (wav, expected) in zip(transcripts, clips, strict=False):
        assert t.text == " ".join(e[0] for e in expected)
        _close_words(t.words, expected)
        assert t.duration == len(wav) / ort_models.RATE
    long = transcripts[-1]  # over 60 s, a conmamba model: one pass
    assert long.text == " ".join(["AB BA"] * 50)
    assert long.source == str(tmp_path / "long.flac")
    period = len(clips[0][0]) / ort_models.RATE
    _close_words(long.words[-2:], [(w, s + 49 * period, e + 49 * period)
                                   for w, s, e in clips[0][1]])
    alone = [next(asr.transcribe([item])).words for item in inputs[:4]]
    assert alone == [t.words for t in transcripts[:4]]  # padding changes nothing


def test_onnx_transcriber_beam_search_and_resampling(level_model: Path) -> None:
    wav, expected = ort_models.spell("ABAB BB")
    asr = OnnxTranscriber.from_folder(level_model, search="beam", beam_size=4)
    assert asr.ctc_beam is not None and asr.ctc_beam.beam_size == 4
    cd = ort_audio.resample(wav, ort_models.RATE, 44100)
    t = next(asr.transcribe([(cd, 44100)]))
    assert t.text == "ABAB BB" and len(cd) > len(wav)
    _close_words(t.words, expected)


def test_onnx_transcriber_refuses_broken_folders(level_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(level_model, broken)
    (broken / "tokens.txt").write_text("<blk> 0\n▁ 2\nA 1\nB 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokens.txt, line 2: '▁ 2'; expected '<symbol> 1'"):
        OnnxTranscriber.from_folder(broken)
    (broken / "tokens.txt").write_text("<blk> 0\n▁ 1\nA 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="3 symbols; the model has 4 outputs"):
        OnnxTranscriber.from_folder(broken)
    with pytest.raises(FileNotFoundError, match=r"model.int8.onnx: missing"):
        OnnxTranscriber.from_folder(broken, quantized=True)
    with pytest.raises(ValueError, match="search must be one of"):
        OnnxTranscriber.from_folder(level_model, search="best")
    card = {"version": CARD_VERSION, "family": "S2S",
            "files": {"model.onnx": sha256_file(broken / "model.onnx")}}
    (broken / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(FileNotFoundError, match=r"encoder.onnx: missing"):
        OnnxTranscriber.from_folder(broken)  # an S2S card: the S2S files are read
    card["family"] = "LM"
    (broken / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="a LM model; the onnxruntime backend runs CTC and S2S"):
        OnnxTranscriber.from_folder(broken)
    (broken / "model.onnx").write_bytes(b"changed")
    with pytest.raises(CardError, match="model.onnx: changed since export"):
        OnnxTranscriber.from_folder(broken)
    proc = subprocess.run([sys.executable, "transcribe.py", str(tmp_path), str(REPO / "README.md"),
                           "--backend", "onnxruntime"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'features.onnx'}: missing; export the model " \
        "with export.py --format onnx\n"


def _run_isolated(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``transcribe.py args`` run as a script in a fresh process; its result and the banned
    modules (torch, speechbrain, our model code, ...) that the process imported."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['transcribe.py', *{args!r}]\n"
        "try:\n"
        "    runpy.run_path('transcribe.py', run_name='__main__')\n"
        "finally:\n"
        f"    banned = sorted(m for m in sys.modules if m.split('.')[0] in {BANNED!r})\n"
        "    print('IMPORTED', banned, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("IMPORTED ")][-1]
    return proc, eval(line.removeprefix("IMPORTED "))  # a list of names


def test_transcribe_onnxruntime_imports_no_torch(level_model: Path, tmp_path: Path) -> None:
    """transcribe.py --backend onnxruntime on short files, a long file through the VAD (a
    Conformer-type model) and an unreadable file: no torch, SpeechBrain or model code."""
    vad_model = tmp_path / "level-conformer"
    ort_models.write_level_model(vad_model, model_type="conformer_ctc")
    short, _ = ort_models.spell("AB BA")
    sf.write(tmp_path / "short.wav", short, ort_models.RATE)
    speech, _ = _speech_and_silence()
    sf.write(tmp_path / "long.flac", np.tile(speech, 4), ort_models.RATE)  # > 60 s
    (tmp_path / "bad.wav").write_text("not audio\n")
    proc, imported = _run_isolated(
        [str(vad_model), str(tmp_path / "short.wav"), str(tmp_path / "long.flac"),
         str(tmp_path / "bad.wav"), "--backend", "onnxruntime", "-o", str(tmp_path / "out"),
         "-f", "json"], REPO)
    assert imported == []
    assert proc.returncode == 1, proc.stderr[-2000:]  # bad.wav
    assert f"error: {tmp_path / 'bad.wav'}: a text file, not audio" in proc.stderr
    assert json.loads((tmp_path / "out" / "short.json").read_text())["text"] == "AB BA"
    assert (tmp_path / "out" / "long.json").is_file()
    # the default backend is still torch, which imports it
    proc, imported = _run_isolated([str(vad_model), str(tmp_path / "short.wav")], REPO)
    assert proc.returncode == 2 and "torch" in imported


NO_EXPORTER = importlib.util.find_spec("mamba_asr.onnx_export") is None
@pytest.fixture(scope="module")
def onnx_export(ctc_graph_export: Path) -> Path:
    """The random-weight CTC demo run exported by export.py --format onnx (pt2, int8)."""
    return ctc_graph_export


@pytest.mark.slow
@pytest.mark.skipif(NO_EXPORTER, reason="the ONNX exporter (mamba_asr/onnx_export.py, "
                                        "export.py --format onnx) is not on this branch yet")
@pytest.mark.parametrize("batched", [False, True])
def test_onnx_export_transcribes_as_torch(onnx_export: Path, demo_corpus: Path,
                                          batched: bool) -> None:
    """The demo CTC model's ONNX export: onnxruntime's transcripts are PyTorch's (the same
    words; times within a frame), short files alone or in padded batches and a 70-s file in
    one pass; and the folder runs in transcribe.py --backend onnxruntime without torch."""
    from mamba_asr.transcriber import Transcriber

    files = sorted((demo_corpus / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))[:6]
    speech = np.concatenate([sf.read(f, dtype="float32")[0] for f in files])
    long = np.tile(speech, -(-70 * 16000 // len(speech)))
    options = {} if batched else {"max_batch_seconds": 1e-3}  # one file a batch
    torch_asr = Transcriber.from_folder(onnx_export, **options)
    onnx_asr = OnnxTranscriber.from_folder(onnx_export, **options)
    frame = torch_asr.frame_seconds
    for ours, theirs in zip(onnx_asr.transcribe([*files, (long, 16000)]),
                            torch_asr.transcribe([*files, (torch.from_numpy(long), 16000)]),
                            strict=True):
        assert ours.text == theirs.text
        assert all(abs(a.start - b.start) <= frame and abs(a.end - b.end) <= frame
                   for a, b in zip(ours.words, theirs.words, strict=True))
    if batched:
        return
    proc, imported = _run_isolated([str(onnx_export), str(files[0]), "--backend",
                                    "onnxruntime"], REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert imported == []
    assert json.loads(proc.stdout)["text"] == next(torch_asr.transcribe(files[:1])).text
