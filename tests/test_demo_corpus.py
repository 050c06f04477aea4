"""The synthetic demo corpus: sentences, determinism, layout, held-out voices, the adapt
splits, word times, the version check, atomic builds."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

from mamba_asr.demo_corpus import WordTimesError, corpus, read_word_times, word_times
from mamba_asr.demo_corpus.espeak import PhonemeEvent, Speech, WordEvent
from mamba_asr.demo_corpus.sentences import SentenceGenerator, vocabulary

COMMITTED_TINY = REPO / "tests" / "data" / "tiny"
TRANSCRIPT = re.compile(r"^[A-Z']+( [A-Z']+)*$")
TINY_UTTERANCES = 28  # 2 speakers x 3 in each of the four LibriSpeech splits, 2 + 1 + 1 adapt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset synthesised from scratch (two workers, with a stamp)."""
    out = tmp_path_factory.mktemp("tiny")
    corpus.build(out, "tiny", workers=2)
    return out


def _variant(voice: str) -> str:
    return voice.split("+", 1)[1]


# --------------------------------------------------------------------------- text


def test_sentence_generator_is_deterministic() -> None:
    a = list(SentenceGenerator(7).unique_sentences(500))
    b = list(SentenceGenerator(7).unique_sentences(500))
    assert a == b
    assert a != list(SentenceGenerator(8).unique_sentences(500))
    assert len(set(a)) == 500


def test_demo_text_vocabulary_and_format() -> None:
    _, jobs = corpus.plan(corpus.PRESETS["demo"])
    texts = [job.text for job in jobs]
    words = {w for text in texts for w in text.split()}
    assert 1500 <= len(words) <= 2500
    assert words <= vocabulary()
    assert len(set(texts)) == len(texts)  # so no test sentence occurs in training
    for text in texts:
        assert TRANSCRIPT.match(text), text
        assert 3 <= len(text.split()) <= 10, text
    assert any("'" in text for text in texts)


def test_demo_plan_size_and_ids() -> None:
    speakers, jobs = corpus.plan(corpus.PRESETS["demo"])
    per_split = {s: sum(j.rel_path.startswith(s + "/") for j in jobs) for s in corpus.SPLITS}
    assert per_split["train-clean-100"] >= 3000
    for split in ("dev-clean", "test-clean", "test-other"):
        assert 200 <= per_split[split] <= 300
    assert [per_split[s] for s in corpus.ADAPT_SPLITS] == [300, 60, 100]
    assert all(1 <= len(s.chapters) <= 3 for s in speakers)
    ids = [s.id for s in speakers]
    assert len(set(ids)) == len(ids) and min(ids) >= 100
    chapters = [c for s in speakers for c in s.chapters]
    assert len(set(chapters)) == len(chapters)


# --------------------------------------------------------------------------- determinism


def test_tiny_build_matches_record_and_committed_copy(tiny: Path) -> None:
    record = corpus.read_record(corpus.checksum_path("tiny"))
    assert corpus.hash_tree(tiny / "LibriSpeech") == record
    assert corpus.hash_tree(COMMITTED_TINY / "LibriSpeech") == record
    assert not (COMMITTED_TINY / corpus.STAMP).exists()


def test_one_worker_gives_the_same_audio(tmp_path: Path) -> None:
    info = corpus.build(tmp_path, "tiny", workers=1, stamp=False)
    assert info["utterances"] == TINY_UTTERANCES
    assert corpus.verify(tmp_path, "tiny") == []


def test_verify_names_changed_files(tmp_path: Path) -> None:
    shutil.copytree(COMMITTED_TINY / "LibriSpeech", tmp_path / "LibriSpeech")
    assert corpus.verify(tmp_path, "tiny") == []
    trans = sorted((tmp_path / "LibriSpeech").rglob("*.trans.txt"))[0]
    trans.write_text(trans.read_text().replace(" ", "  ", 1))
    flac = sorted((tmp_path / "LibriSpeech").rglob("*.flac"))[-1]
    samples, rate = sf.read(flac, dtype="int16")
    samples[len(samples) // 2] ^= 1
    sf.write(flac, samples, rate, format="FLAC", subtype="PCM_16")
    problems = corpus.verify(tmp_path, "tiny")
    assert len(problems) == 2
    assert any(trans.name in p for p in problems) and any(flac.name in p for p in problems)


def test_build_fails_on_checksum_mismatch(tmp_path: Path, monkeypatch) -> None:
    lines = corpus.checksum_path("tiny").read_text().splitlines(keepends=True)
    k = next(i for i, line in enumerate(lines) if line.endswith("0001.flac", 0, line.find("\t")))
    rel, digest, n = lines[k].rstrip("\n").split("\t")
    lines[k] = f"{rel}\t{'0' * 64}\t{n}\n"
    record = tmp_path / "checksums_tiny.tsv"
    record.write_text("".join(lines))
    monkeypatch.setattr(corpus, "checksum_path", lambda preset: record)
    with pytest.raises(corpus.CorpusMismatch, match=re.escape(rel)):
        corpus.build(tmp_path / "out", "tiny", workers=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- layout


def _check_layout(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == sorted([*corpus.SPLITS, "SPEAKERS.TXT"])
    for split in corpus.SPLITS:
        for spk_dir in (root / split).iterdir():
            assert spk_dir.name.isdigit()
            for chapter_dir in spk_dir.iterdir():
                assert chapter_dir.name.isdigit()
                prefix = f"{spk_dir.name}-{chapter_dir.name}"
                names = sorted(p.name for p in chapter_dir.iterdir())
                trans = chapter_dir / f"{prefix}.trans.txt"
                assert trans.name in names
                lines = trans.read_text(encoding="utf-8").splitlines()
                ids = [line.split(" ", 1)[0] for line in lines]
                assert ids == [f"{prefix}-{i:04d}" for i in range(len(lines))]
                words = f"{prefix}.words.tsv"
                assert sorted(names) == sorted([trans.name, words, *(f"{i}.flac" for i in ids)])
                for line in lines:
                    assert TRANSCRIPT.match(line.split(" ", 1)[1]), line


def test_layout_and_transcripts(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir()) == ["LibriSpeech", corpus.STAMP]
    _check_layout(tiny / "LibriSpeech")
    _check_layout(COMMITTED_TINY / "LibriSpeech")


def test_audio_is_16k_mono_pcm16_flac() -> None:
    flacs = sorted((COMMITTED_TINY / "LibriSpeech").rglob("*.flac"))
    assert len(flacs) == TINY_UTTERANCES
    for flac in flacs:
        info = sf.info(flac)
        assert (info.samplerate, info.channels) == (16000, 1)
        assert (info.format, info.subtype) == ("FLAC", "PCM_16")
        assert 0.3 < info.duration < 10


def test_committed_tiny_corpus_is_small() -> None:
    assert sum(p.stat().st_size for p in COMMITTED_TINY.rglob("*") if p.is_file()) < 350_000


# --------------------------------------------------------------------------- voices


def test_speakers_txt_and_held_out_voices() -> None:
    rows = corpus.read_speakers(COMMITTED_TINY / "LibriSpeech")
    assert len(rows) == 11 and {r["subset"] for r in rows} == set(corpus.SPLITS)
    for row in rows:
        assert row["sex"] == ("F" if _variant(row["name"]).startswith("f") else "M")
    # The demo preset's voice table (SPEAKERS.TXT lists exactly these voices).
    variants = {s: {v.variant for v in corpus.VOICES[s]} for s in corpus.SPLITS}
    seen = variants["train-clean-100"] | variants["dev-clean"]
    assert not variants["test-clean"] & seen
    assert not variants["test-other"] & (seen | variants["test-clean"])
    assert not variants["dev-clean"] & variants["train-clean-100"]
    assert len(variants["train-clean-100"]) >= 6
    train_rate = max(v.rate for v in corpus.VOICES["train-clean-100"])
    assert min(v.rate for v in corpus.VOICES["test-other"]) > train_rate
    _, jobs = corpus.plan(corpus.PRESETS["demo"])
    noisy = ("test-other/", *(f"{s}/" for s in corpus.ADAPT_SPLITS))
    assert all((j.snr_db is not None) == j.rel_path.startswith(noisy) for j in jobs)
    test_other = {v.name for v in corpus.VOICES["test-other"]}
    assert {r["name"] for r in rows if r["subset"] in corpus.ADAPT_SPLITS} <= test_other


# --------------------------------------------------------------------------- adapt splits


def test_adapt_splits_speak_test_other_voices_new_sentences_new_ids() -> None:
    speakers, jobs = corpus.plan(corpus.PRESETS["demo"])
    voices = {v.name: v for v in corpus.VOICES["test-other"]}
    adapt = [j for j in jobs if j.rel_path.split("/", 1)[0] in corpus.ADAPT_SPLITS]
    others = [j for j in jobs if j not in adapt]
    for split in corpus.ADAPT_SPLITS:  # every test-other voice in every adapt split
        assert {j.voice for j in adapt if j.rel_path.startswith(split + "/")} == set(voices)
    for job in adapt:  # test-other's settings: its rates, pitches and noise
        voice = voices[job.voice]
        assert round(0.93 * voice.rate) <= job.rate <= round(1.07 * voice.rate), job
        assert abs(job.pitch - voice.pitch) <= 5 and abs(job.pitch_range - voice.pitch_range) <= 8
        assert job.snr_db is not None and 15 <= job.snr_db <= 20, job
    assert not {j.text for j in adapt} & {j.text for j in others}
    ours = [s for s in speakers if s.split in corpus.ADAPT_SPLITS]
    rest = [s for s in speakers if s not in ours]
    assert len(ours) == 12 and not {s.id for s in ours} & {s.id for s in rest}
    assert not {c for s in ours for c in s.chapters} & {c for s in rest for c in s.chapters}


def test_prepare_reads_the_adapt_splits_beside_word_times(tmp_path: Path) -> None:
    from mamba_asr.librispeech import prepare_librispeech

    counts = prepare_librispeech(
        COMMITTED_TINY, tmp_path, ["adapt-train"], ["adapt-dev"], ["adapt-test"], num_workers=1
    )
    assert counts == {"adapt-train.csv": 2, "adapt-dev.csv": 1, "adapt-test.csv": 1}


# --------------------------------------------------------------------------- idempotency


def test_second_build_is_a_no_op(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny, out)

    def boom(*args, **kwargs):
        raise AssertionError("synthesised again")

    monkeypatch.setattr(corpus, "render", boom)
    monkeypatch.setattr(corpus, "synthesise_all", boom)
    info = corpus.build(out, "tiny", workers=2)
    assert info["already_present"] and info["utterances"] == TINY_UTTERANCES
    # --force rebuilds: the old corpus and its stamp go first, so a failure leaves neither.
    with pytest.raises(AssertionError, match="synthesised again"):
        corpus.build(out, "tiny", workers=2, force=True)
    assert list(out.iterdir()) == []


def _file_times(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_cli_reports_already_present_and_verifies(tiny: Path) -> None:
    """A second run on a complete corpus writes nothing (every file keeps its mtime)."""
    cli = [sys.executable, "-m", "mamba_asr.demo_corpus", "--out", str(tiny)]
    before = _file_times(tiny)
    again = subprocess.run([*cli, "--preset", "tiny"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "already present" in again.stdout and "vocabulary" in again.stdout
    assert _file_times(tiny) == before and len(before) > 24
    ok = subprocess.run([*cli, "--verify"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "every file matches" in ok.stdout
    help_run = subprocess.run([*cli, "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_run.returncode == 0 and "--write-checksums" in help_run.stdout


def test_interrupted_build_leaves_no_corpus(tmp_path: Path, monkeypatch) -> None:
    real = corpus.synthesise_all

    def interrupted(folder: Path, jobs: list, workers: int) -> list:
        real(folder, jobs[:4], 1)
        assert len(list(folder.rglob("*.flac"))) == 4
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "synthesise_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        corpus.build(tmp_path, "tiny", workers=1)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_librispeech(tmp_path: Path) -> None:
    (tmp_path / "LibriSpeech").mkdir()
    (tmp_path / "LibriSpeech" / "README.TXT").write_text("real data")
    with pytest.raises(FileExistsError):
        corpus.build(tmp_path, "tiny", workers=1)
    assert (tmp_path / "LibriSpeech" / "README.TXT").exists()


# --------------------------------------------------------------------------- word times

WORDS_LINE = re.compile(r"^(\d+-\d+-\d{4})\t([A-Z']+)\t(\d+\.\d{3})\t(\d+\.\d{3})$")


def _power_db(samples: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(samples.astype(np.float64) ** 2)) + 1e-12)


def assert_times_fit_audio(samples: np.ndarray, words: list[tuple[str, float, float]]) -> None:
    """Word times of one file lie in it, in order, and agree with its energy: every word's span
    is near the speech's level, and the silences (the lead and the trail, gaps between words of
    20 ms or more, each 5 ms in from its ends) are quieter than every word."""
    rate = corpus.SAMPLE_RATE
    duration = len(samples) / rate
    assert all(0 < start < end <= duration for _, start, end in words), words
    assert all(a[2] <= b[1] for a, b in pairwise(words)), words

    def span(a: float, b: float) -> np.ndarray:
        return samples[round(a * rate) : round(b * rate)]

    speech = _power_db(np.concatenate([span(a, b) for _, a, b in words]))
    quiet = [(0.0, words[0][1] - 0.005), (words[-1][2] + 0.005, duration)]
    quiet += [(a[2] + 0.005, b[1] - 0.005) for a, b in pairwise(words) if b[1] - a[2] >= 0.02]
    word_db = [_power_db(span(a, b)) - speech for _, a, b in words]
    quiet_db = [_power_db(span(a, b)) - speech for a, b in quiet]
    assert min(word_db) > -12, (words, word_db)
    assert max(quiet_db) < min(word_db) - 5, (words, quiet, quiet_db, word_db)


def _transcripts(split_dir: Path) -> dict[str, list[str]]:
    lines = [ln for t in split_dir.rglob("*.trans.txt") for ln in t.read_text().splitlines()]
    return {utt: text.split() for utt, text in (line.split(" ", 1) for line in lines)}


def test_word_times_of_every_utterance(tiny: Path) -> None:
    """Built and committed tiny corpora: a well-formed words.tsv per chapter, every utterance's
    words as in its transcript, times inside the file, in order, and where the sound is."""
    for root in (tiny / "LibriSpeech", COMMITTED_TINY / "LibriSpeech"):
        for split in corpus.SPLITS:
            for tsv in (root / split).rglob("*.words.tsv"):
                for line in tsv.read_text().splitlines():
                    assert WORDS_LINE.match(line), (tsv, line)
            times = read_word_times(root.parent if root.parent == tiny else root, split)
            assert {u: [w for w, _, _ in ws] for u, ws in times.items()} == _transcripts(
                root / split
            )
            for utt, words in times.items():
                spk, chapter, _ = utt.split("-")
                samples, _ = sf.read(root / split / spk / chapter / f"{utt}.flac", dtype="int16")
                assert_times_fit_audio(samples, words)
                assert words[0][1] >= corpus.LEAD_S  # after the lead silence


def _job_starting(jobs: list[corpus.Job], voice_part: str, text_part: str) -> corpus.Job:
    return next(j for j in jobs if voice_part in j.voice and text_part in f" {j.text} ")


def test_word_times_of_words_espeak_speaks_as_one(tmp_path: Path) -> None:
    """Demo utterances where eSpeak gives one word event to two words ("there are", "on the",
    and an h-dropping voice's first word "Hugo's", which gets none) still time every word."""
    _, jobs = corpus.plan(corpus.PRESETS["demo"])
    picked = [
        _job_starting(jobs, "", " THERE WAS "),
        _job_starting(jobs, "en-us+", " THERE ARE "),
        _job_starting(jobs, "", " ON THE "),
        _job_starting(jobs, "en-us-nyc+linda", " HUGO'S "),  # test-other: noisy
    ]
    for written in corpus.synthesise_all(tmp_path, picked, workers=1):
        job = picked[[j.rel_path for j in picked].index(written.rel_path)]
        assert [w for w, _, _ in written.words] == job.text.split()
        samples, _ = sf.read(tmp_path / written.rel_path, dtype="int16")
        assert_times_fit_audio(samples, written.words)
        assert all(end - start >= 0.03 for _, start, end in written.words), written.words


def _speech(words: list[tuple[int, int]], phonemes: list[tuple[str, int, int]]) -> Speech:
    return Speech(
        np.zeros(1, np.int16),
        [WordEvent(offset, 1, ms) for offset, ms in words],
        [PhonemeEvent(*p) for p in phonemes],
    )


ALONE = {
    "THERE": ["ð", "ˈɛɹ"],
    "WAS": ["w", "ˈʌ", "z"],
    "ARE": ["ɑːɹ"],
    "A": ["ɐ"],
    "DOG": ["d", "ˈɑː", "ɡ"],
    "HUGO'S": ["j", "ˈuː", "ɡ", "oʊ", "z"],
}


def test_word_starts_from_word_and_phoneme_events() -> None:
    dog = [("ɐ", 400, 1), ("d", 460, 2), ("ˈɑː", 500, 2), ("ɡ", 560, 2)]
    # One event for "there was" (eSpeak's phonemes: stress and r-colouring differ from alone).
    speech = _speech(
        [(0, 0), (10, 400), (12, 450)],
        [("ð", 11, 0), ("ɛ", 58, 0), ("ɹ", 120, 0), ("w", 165, 0), ("ˌʌ", 249, 0), *dog],
    )
    assert word_times.word_starts_ms("THERE WAS A DOG", speech, ALONE.__getitem__) == [
        0,
        165,
        400,
        450,
    ]
    speech = _speech(
        [(0, 0), (10, 400), (12, 450)],
        [("ð", 11, 0), ("eə", 58, 0), ("ɹ", 120, 0), ("ˌɑː", 190, 0), *dog],
    )
    assert word_times.word_starts_ms("THERE ARE A DOG", speech, ALONE.__getitem__)[1] == 190
    # No event for the first word: it starts at its first phoneme.
    speech = _speech([(7, 287)], [("j", 9, -1), ("ˈuː", 87, -1), ("z", 281, -1), ("d", 290, 0)])
    assert word_times.word_starts_ms("HUGO'S DOG", speech, ALONE.__getitem__) == [9, 287]
    with pytest.raises(ValueError, match="not at distinct word starts"):
        word_times.word_starts_ms("A DOG", _speech([(0, 0), (1, 60)], []), ALONE.__getitem__)
    with pytest.raises(ValueError, match=r"cannot place \['THERE', 'WAS'\]"):
        word_times.word_starts_ms(
            "THERE WAS", _speech([(0, 0)], [("ð", 11, 0), ("eə", 58, 0)]), ALONE.__getitem__
        )


def test_word_bounds_leave_out_closures_and_pauses() -> None:
    """Tones as words: word 2's event is at the start of its 50 ms closure, word 3 is
    followed by a 100 ms pause inside its span; each bound lies within the envelope's 5 ms."""
    rate = 16000

    def at(seconds: float) -> int:
        return round(seconds * rate)

    y = np.zeros(at(1.0))
    sound = [(0.10, 0.30, 1.0), (0.35, 0.55, 1.0), (0.55, 0.70, 0.5), (0.80, 0.90, 1.0)]
    for a, b, amplitude in sound:
        y[at(a) : at(b)] = amplitude * np.sin(2 * np.pi * 200 * np.arange(at(b) - at(a)) / rate)
    events = [at(t) for t in (0.10, 0.30, 0.55, 0.80)]
    bounds = word_times.word_bounds(y, events, at(0.10), at(0.90), rate)
    got = [t / rate for bound in bounds for t in bound]
    assert got == pytest.approx([t for a, b, _ in sound for t in (a, b)], abs=0.0055)
    with pytest.raises(ValueError, match="word 1 has no sound"):
        word_times.word_bounds(y, [at(0.10), at(0.31), at(0.33)], at(0.10), at(0.90), rate)


# --------------------------------------------------------------------------- version check


def test_version_2_corpus_is_named_then_rebuilt(tiny: Path, tmp_path: Path) -> None:
    """A corpus built before word times: the reader and verify name its version and the
    command; a build replaces it."""
    out = tmp_path / "old"
    shutil.copytree(tiny, out)
    for tsv in (out / "LibriSpeech").rglob("*.words.tsv"):
        tsv.unlink()
    stamp = json.loads((out / corpus.STAMP).read_text())
    (out / corpus.STAMP).write_text(json.dumps({**stamp, "spec_version": 2, "fingerprint": "x"}))
    with pytest.raises(WordTimesError, match="built by demo-corpus version 2.*--out"):
        read_word_times(out, "test-clean")
    (problem,) = corpus.verify(out)
    assert "version 2" in problem and f"--out {out}" in problem
    info = corpus.build(out, "tiny", workers=2)
    assert not info.get("already_present") and info["spec_version"] == corpus.SPEC_VERSION == 3
    assert corpus.verify(out) == []
    assert len(read_word_times(out, "test-clean")) == 6


def test_word_time_files_missing_or_wrong(tmp_path: Path) -> None:
    shutil.copytree(COMMITTED_TINY / "LibriSpeech", tmp_path / "LibriSpeech")
    tsv = sorted((tmp_path / "LibriSpeech" / "dev-clean").rglob("*.words.tsv"))[0]
    good = tsv.read_text()
    tsv.unlink()
    with pytest.raises(WordTimesError, match=re.escape(f"{tsv} is missing") + ".*version 3"):
        read_word_times(tmp_path, "dev-clean")
    first, rest = good.split("\n", 1)
    tsv.write_text(first.replace("\t", " ", 1) + "\n" + rest)
    with pytest.raises(WordTimesError, match=re.escape(f"{tsv}:1: ")):
        read_word_times(tmp_path, "dev-clean")
    utt, word, start, end = first.split("\t")
    tsv.write_text(f"{utt}\tNOT{word}\t{start}\t{end}\n" + rest)
    with pytest.raises(WordTimesError, match=f"word times of {utt} name .*NOT{word}"):
        read_word_times(tmp_path, "dev-clean")
    tsv.write_text(f"{utt}\t{word}\t{end}\t{start}\n" + rest)
    with pytest.raises(WordTimesError, match=re.escape(f"{tsv}:1: {word} at {end}-{start} s")):
        read_word_times(tmp_path, "dev-clean")
    with pytest.raises(WordTimesError, match="no such split folder.*adapt-dev"):
        read_word_times(tmp_path, "dev-other")
