"""transcribe.py and Transcriber on the CTC demo run's export: bad inputs never stop the good
ones, every output format written, inputs from folders and standard input, a run folder as
the model, and a 10-minute file in one encoder pass with bounded memory."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torchaudio

import transcribe
from mamba_asr import audio_io
from mamba_asr.config import ConfigError
from mamba_asr.long_audio import peak_memory
from mamba_asr.transcriber import Transcriber
from mamba_asr.transcript import FORMATS

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def _test_clean(demo_corpus: Path, n: int) -> list[Path]:
    return sorted((demo_corpus / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))[:n]


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.lstat().st_mtime_ns, hashlib.sha256(
        p.read_bytes()).hexdigest() if p.is_file() else "") for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_bad_inputs_do_not_stop_the_others(ctc_export: Path, demo_corpus: Path,
                                           tmp_path: Path) -> None:
    """Each bad input: one ``error: <file>: <reason>`` line; the good files (one of them the
    same recording as 44.1 kHz stereo 24-bit WAV) and the silence are transcribed, every
    format written; exit status 1 with the count."""
    audio = tmp_path / "in"
    audio.mkdir()
    flac = _test_clean(demo_corpus, 1)[0]
    good = audio / "good.flac"
    good.write_bytes(flac.read_bytes())
    wav, rate = sf.read(flac, dtype="float32")
    cd = torchaudio.functional.resample(torch.from_numpy(wav), rate, 44100).numpy()
    sf.write(audio / "cd.wav", list(zip(cd, cd, strict=True)), 44100, subtype="PCM_24")
    sf.write(audio / "silence.wav", [0.0] * (2 * SR), SR, subtype="PCM_16")
    (audio / "empty.wav").write_bytes(b"")
    (audio / "notes.txt").write_text("not audio\n")
    (audio / "talk.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))
    whole = (audio / "good.flac").read_bytes()
    sf.write(audio / "cut.wav", wav, SR, subtype="PCM_16")
    (audio / "cut.wav").write_bytes((audio / "cut.wav").read_bytes()[:2000])
    inputs = [good, audio / "cd.wav", audio / "silence.wav", audio / "empty.wav",
              audio / "notes.txt", audio / "talk.m4a", audio / "cut.wav", audio / "gone.flac"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "transcribe.py", str(ctc_export), *map(str, inputs), "--output_dir",
         str(out), "--quiet"], cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    bad = inputs[3:]
    assert len(errors) == len(bad) + 1, proc.stderr
    for path in bad:
        assert sum(ln.startswith(f"error: {path}: ") for ln in errors) == 1, path
    assert "m4a" in next(ln for ln in errors if "talk.m4a" in ln) and "ffmpeg" in proc.stderr
    assert errors[-1] == f"error: {len(bad)} of {len(inputs)} input(s) could not be transcribed"
    assert (audio / "good.flac").read_bytes() == whole
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{stem}.{fmt}" for stem in ("good", "cd", "silence")
                             for fmt in FORMATS)
    docs = {stem: json.loads((out / f"{stem}.json").read_text()) for stem in ("good", "cd",
                                                                               "silence")}
    assert docs["silence"]["duration"] == 2.0  # transcribed (by random weights: not empty)
    assert docs["good"]["text"] and docs["good"]["duration"] == round(len(wav) / SR, 3)
    assert docs["cd"]["duration"] == pytest.approx(len(wav) / SR, abs=1e-3)
    assert (out / "good.txt").read_text().split() == docs["good"]["text"].split()


def test_clashing_names_and_empty_input_are_refused_first(tmp_path: Path) -> None:
    """Two inputs that would write the same <stem>.<format>: refused before the model loads
    (the model path does not even exist)."""
    (tmp_path / "a").mkdir()
    for name in ("a/talk.flac", "talk.wav"):
        sf.write(tmp_path / name, [0.0] * 160, SR)
    with pytest.raises(ConfigError, match=r"talk\.<format> for .*talk.* and .*talk"):
        transcribe.main(["no-model", str(tmp_path / "a"), str(tmp_path / "talk.wav"),
                         "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="no audio to transcribe"):
        transcribe.main(["no-model", str(tmp_path / "missing.flac")])


@pytest.mark.slow
def test_stdin_paths_to_json_lines_and_a_run_folder(ctc_random_run: Path, ctc_export: Path,
                                                    demo_corpus: Path, monkeypatch,
                                                    capsys) -> None:
    """``-`` reads paths from stdin; without --output_dir, JSON Lines naming each input.
    The run folder as the model gives the export's transcripts and is left untouched."""
    files = _test_clean(demo_corpus, 3)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(map(str, files)) + "\n\n"))
    assert transcribe.main([str(ctc_export), "-", "--quiet"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [d["source"] for d in lines] == list(map(str, files))
    before = _snapshot(ctc_random_run)
    from_run = [t.text for t in Transcriber.load(ctc_random_run).transcribe(files)]
    assert from_run == [d["text"] for d in lines]
    assert _snapshot(ctc_random_run) == before


@pytest.mark.slow
def test_silence_is_an_empty_transcript(ctc_run: Path, tmp_path: Path) -> None:
    """A trained model (two epochs: it has learnt the blank) hears nothing in silence: an
    empty transcript in every format, not an error."""
    sf.write(tmp_path / "silence.flac", [0.0] * (3 * SR), SR)
    assert transcribe.main([str(ctc_run), str(tmp_path / "silence.flac"), "--output_dir",
                            str(tmp_path / "out"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "out" / "silence.json").read_text())
    assert (doc["text"], doc["words"], doc["segments"], doc["duration"]) == ("", [], [], 3.0)
    assert (tmp_path / "out" / "silence.srt").read_text() == ""
    assert (tmp_path / "out" / "silence.vtt").read_text() == "WEBVTT\n"


def _ten_minutes(demo_corpus: Path) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Demo test-clean utterances 0.5 s apart, to 10 minutes; their spans in seconds."""
    files = sorted((demo_corpus / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))
    pieces, spans, at = [], [], 0
    gap = torch.zeros(SR // 2)
    while at < 600 * SR:
        wav = audio_io.load_audio(files[len(spans) % len(files)], SR)
        spans.append((at / SR, (at + len(wav)) / SR))
        pieces += [wav, gap]
        at += len(wav) + len(gap)
    return torch.cat(pieces)[: 600 * SR], spans


def _setup(folder: str, corpus: str) -> tuple[Transcriber, torch.Tensor]:
    torch.set_num_threads(1)
    return Transcriber.from_folder(folder), _ten_minutes(Path(corpus))[0]


def _run(inputs: tuple[Transcriber, torch.Tensor]) -> None:
    asr, wav = inputs
    next(iter(asr.transcribe([(wav, SR)])))


@pytest.mark.slow
def test_ten_minutes_in_one_pass(ctc_export: Path, demo_corpus: Path, monkeypatch) -> None:
    """One encoder call over the whole file (the random-weight model: words everywhere);
    word times increase and stay in the file; the pass's peak memory is bounded."""
    wav, _ = _ten_minutes(demo_corpus)
    asr = Transcriber.from_folder(ctc_export)
    encoder = asr.hparams.Transformer
    calls: list[int] = []
    original = encoder.encode

    def counting(src, *args, **kwargs):
        calls.append(src.shape[1])
        return original(src, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode", counting)
    t = next(iter(asr.transcribe([(wav, SR)])))
    assert calls == [math.ceil((len(wav) // 160 + 1) / 4)]  # 10 ms frames, 4x subsampled
    assert len(t.words) > 300 and t.duration == 600.0  # random weights: words everywhere
    ends = [0.0] + [w.end for w in t.words]
    assert all(w.start >= prev and w.end >= w.start for w, prev in zip(t.words, ends,
                                                                     strict=False))
    assert 590.0 < t.words[-1].end <= 600.0
    # What the pass adds to a process holding the model and the audio (10 min = 38 MB):
    # linear in length, about 25 KB per 40 ms frame (the encoder's layer activations); one
    # (T, T) float32 matrix alone would be 900 MB, the one-call front-end another 110 MB.
    extra = peak_memory(_run, functools.partial(_setup, str(ctc_export), str(demo_corpus)))
    assert extra < 40_000 * calls[0], extra


@pytest.mark.slow
def test_beyond_the_one_pass_limit_vad_segments(ctc_export: Path, demo_corpus: Path,
                                               monkeypatch) -> None:
    """A file longer than max_pass_seconds is split at pauses by the VAD into segments of at
    most that length, each transcribed (in one pass when it is long); times stay the file's."""
    from mamba_asr import vad

    wav = _ten_minutes(demo_corpus)[0][: 90 * SR]
    segments: list[list[tuple[int, int]]] = []
    original = vad.speech_segments

    def spy(*args, **kwargs):
        segments.append(original(*args, **kwargs))
        return segments[-1]

    monkeypatch.setattr(vad, "speech_segments", spy)
    asr = Transcriber.from_folder(ctc_export, max_pass_seconds=40.0)
    t = next(iter(asr.transcribe([(wav, SR)])))
    (found,) = segments
    assert len(found) >= 3 and all(b - a <= 40 * SR for a, b in found)
    assert found == sorted(found) and found[-1][1] <= len(wav)
    ends = [0.0] + [w.end for w in t.words]
    assert all(w.start >= prev for w, prev in zip(t.words, ends, strict=False))
    # every word inside the segment it was heard in
    assert all(any(a / SR <= w.start and w.end <= b / SR + 0.04 for a, b in found)
               for w in t.words)
    assert t.words[-1].end > 80.0 and t.duration == 90.0


def test_word_times_stay_in_order_and_inside_the_audio() -> None:
    """Where two segments' words meet (the last frame of one runs 40 ms past the next's
    start) and at the end of the audio, times are clipped, never reordered."""
    from mamba_asr.transcriber import _in_order
    from mamba_asr.transcript import Word

    words = [Word("A", 0.0, 1.04, 0.9), Word("B", 1.0, 1.5, 0.8), Word("C", 1.96, 2.04, 0.7)]
    fixed = _in_order(words, duration=2.0)
    assert [(w.start, w.end) for w in fixed] == [(0.0, 1.04), (1.04, 1.5), (1.96, 2.0)]
    assert [w.probability for w in fixed] == [0.9, 0.8, 0.7]
