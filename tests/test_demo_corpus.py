"""The synthetic demo corpus: sentences, determinism, layout, held-out voices, atomic builds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from conftest import REPO

from mamba_asr.demo_corpus import corpus
from mamba_asr.demo_corpus.sentences import SentenceGenerator, vocabulary

COMMITTED_TINY = REPO / "tests" / "data" / "tiny"
TRANSCRIPT = re.compile(r"^[A-Z']+( [A-Z']+)*$")


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
    assert info["utterances"] == 24
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
                assert sorted(names) == sorted([trans.name, *(f"{i}.flac" for i in ids)])
                for line in lines:
                    assert TRANSCRIPT.match(line.split(" ", 1)[1]), line


def test_layout_and_transcripts(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir()) == ["LibriSpeech", corpus.STAMP]
    _check_layout(tiny / "LibriSpeech")
    _check_layout(COMMITTED_TINY / "LibriSpeech")


def test_audio_is_16k_mono_pcm16_flac() -> None:
    flacs = sorted((COMMITTED_TINY / "LibriSpeech").rglob("*.flac"))
    assert len(flacs) == 24
    for flac in flacs:
        info = sf.info(flac)
        assert (info.samplerate, info.channels) == (16000, 1)
        assert (info.format, info.subtype) == ("FLAC", "PCM_16")
        assert 0.3 < info.duration < 10


def test_committed_tiny_corpus_is_small() -> None:
    assert sum(p.stat().st_size for p in COMMITTED_TINY.rglob("*") if p.is_file()) < 300_000


# --------------------------------------------------------------------------- voices


def test_speakers_txt_and_held_out_voices() -> None:
    rows = corpus.read_speakers(COMMITTED_TINY / "LibriSpeech")
    assert len(rows) == 8 and {r["subset"] for r in rows} == set(corpus.SPLITS)
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
    assert all((j.snr_db is not None) == j.rel_path.startswith("test-other/") for j in jobs)


# --------------------------------------------------------------------------- idempotency


def test_second_build_is_a_no_op(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny, out)

    def boom(*args, **kwargs):
        raise AssertionError("synthesised again")

    monkeypatch.setattr(corpus, "render", boom)
    monkeypatch.setattr(corpus, "synthesise_all", boom)
    info = corpus.build(out, "tiny", workers=2)
    assert info["already_present"] and info["utterances"] == 24
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
