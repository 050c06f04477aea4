"""prepare_folder: manifests of a user's own corpus (folder or TSV), text normalisation,
per-line reports, resampling into a cache, errors, and the recipes reading the manifests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO, logged_epochs, write_flac

from mamba_asr import folder_corpus as fc
from mamba_asr.transcript_text import LIBRISPEECH_CHARACTERS, normalise


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["ID", "duration", "wav", "spk_id", "wrd"]
        return {r["ID"]: r for r in reader}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Three speakers' folders: FLAC, WAV, 8 kHz, stereo, a digit line, an empty transcript,
    audio without a transcript and a transcript without audio."""
    root = tmp_path / "corpus"
    write_flac(root / "alice" / "a1.flac", 16000)
    (root / "alice" / "a1.txt").write_text(
        "\u201cHello,\u201d she said\u2014it\u2019s the caf\u00e9's well-known   menu!\n",
        encoding="utf-8",
    )
    sf.write(root / "alice" / "a2.wav", np.zeros(12000, dtype=np.int16), 16000)
    (root / "alice" / "a2.txt").write_text("up/down\nand\tagain\n")
    write_flac(root / "bob" / "b1.flac", 8000, sample_rate=8000)
    (root / "bob" / "b1.txt").write_text("eight kilohertz")
    write_flac(root / "bob" / "b2.flac", 24000, channels=2)
    (root / "bob" / "b2.txt").write_text("two channels")
    write_flac(root / "carol" / "c1.flac", 9000)
    (root / "carol" / "c1.txt").write_text("fine\nI have 3 cats\n")
    write_flac(root / "carol" / "c2.flac", 9100)
    (root / "carol" / "c2.txt").write_text("  \n")
    write_flac(root / "carol" / "c3.flac", 9200)
    (root / "carol" / "notes.txt").write_text("not a transcript")
    return root


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It\u2019s rock \u2019n\u2019 roll.", ("IT'S ROCK 'N' ROLL", None)),
        ("well-known and/or \u2014 fine", ("WELL KNOWN AND OR FINE", None)),
        ("Caf\u00e9 na\u00efve \u00c5ngstr\u00f6m", ("CAFE NAIVE ANGSTROM", None)),
        ("\uff28\uff45\uff4c\uff4c\uff4f  \t world?!", ("HELLO WORLD", None)),  # full width
        ("\"quoted\" ' (aside)", ("QUOTED ASIDE", None)),
        ("I have 3 cats", ("I HAVE 3 CATS", "3")),
        ("50% off", ("50% OFF", "5")),
        ("100 %", ("100 %", "1")),
        ("half %", ("HALF %", "%")),
        ("rock & roll", ("ROCK & ROLL", "&")),
        ("a + b", ("A + B", "+")),
        ("\u00c6sir", ("\u00c6SIR", "\u00c6")),
        ("\u65e5\u672c", ("\u65e5\u672c", "\u65e5")),
        ("!?", ("", None)),
    ],
)
def test_normalise_to_the_librispeech_characters(text, expected) -> None:
    assert normalise(text, LIBRISPEECH_CHARACTERS) == expected


def test_normalise_follows_the_case_of_the_characters() -> None:
    assert normalise("Hello World", " abcdefghijklmnopqrstuvwxyz") == ("hello world", None)
    assert normalise("\u00c9t\u00e9", " ABCabcT\u00e9\u00c9t") == ("\u00c9t\u00e9", None)
    assert normalise("it's", " ITS") == ("ITS", None)  # no apostrophe in the set


def test_default_characters_are_the_ctc_recipes() -> None:
    assert fc.hparams_characters(REPO / "hparams" / "CTC" / "demo.yaml") == LIBRISPEECH_CHARACTERS
    assert fc.hparams_characters(REPO / "hparams" / "S2S" / "demo.yaml") == LIBRISPEECH_CHARACTERS


# --------------------------------------------------------------------------- folder corpus


def test_folder_rows_reports_and_left_out_file(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    result = fc.prepare_folder(corpus, out, "train", num_workers=1)
    rows = read_rows(out / "train.csv")
    assert result.rows == len(rows) == 4
    expected = {
        "a1": ("1.0", corpus / "alice" / "a1.flac", "alice",
               "HELLO SHE SAID IT'S THE CAFE'S WELL KNOWN MENU"),
        "a2": ("0.75", corpus / "alice" / "a2.wav", "alice", "UP DOWN AND AGAIN"),
        "b1": ("1.0", corpus / "bob" / "b1.flac", "bob", "EIGHT KILOHERTZ"),
        "b2": ("1.5", corpus / "bob" / "b2.flac", "bob", "TWO CHANNELS"),
    }
    assert {i: (r["duration"], Path(r["wav"]), r["spk_id"], r["wrd"])
            for i, r in rows.items()} == expected
    c = corpus / "carol"
    assert result.left_out == [
        f"{c / 'c1.txt'}:2: 'I have 3 cats' contains '3' (digits: write numbers as words)",
        f"{c / 'c2.txt'}:1: empty transcript",
    ]
    assert result.unpaired == [
        f"{c / 'notes.txt'}: transcript without an audio file",
        f"{c / 'c3.flac'}: audio file without a transcript (c3.txt)",
    ]
    assert (out / "train_left_out.txt").read_text().splitlines() == [
        *result.left_out, *result.unpaired
    ]
    assert result.formats == (
        f"1 of 4 audio files are not at sample_rate 16000 Hz (1 at 8000 Hz; e.g. "
        f"{corpus / 'bob' / 'b1.flac'}: 8000 Hz): they are resampled to 16000 Hz; 1 of 4 audio "
        f"files have several channels (e.g. {corpus / 'bob' / 'b2.flac'}: 2 channels): they are "
        "averaged to mono on loading"
    )


def test_cli_prints_the_summary_and_removes_a_stale_report(corpus: Path, tmp_path: Path,
                                                           capsys) -> None:
    out = tmp_path / "prep"
    for name in ("c1", "c2", "c3"):
        (corpus / "carol" / f"{name}.txt").write_text("fixed now")
    (corpus / "carol" / "notes.txt").unlink()
    stale = out / "dev_left_out.txt"
    stale.parent.mkdir()
    stale.write_text("old\n")
    assert fc.main([str(corpus / "carol"), "--out", str(out), "--name", "dev"]) == 0
    assert sorted(read_rows(out / "dev.csv")) == ["c1", "c2", "c3"]
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["dev.csv", "3", "0.00", "1", "6", "2"]
    assert not stale.exists()  # nothing left out: no report of an earlier run stays


def test_ids_unique_without_commas(tmp_path: Path) -> None:
    root = tmp_path / "c"
    for rel in ("s1/take.flac", "s2/take.flac", "s3/a, b.flac", "s3/a__b.flac", "s4/x y.flac"):
        write_flac(root / rel, 4000)
        (root / rel).with_suffix(".txt").write_text("word")
    fc.prepare_folder(root, tmp_path / "out", num_workers=1)
    rows = read_rows(tmp_path / "out" / "train.csv")
    assert {i: Path(r["wav"]).relative_to(root).as_posix() for i, r in rows.items()} == {
        "s1-take": "s1/take.flac", "s2-take": "s2/take.flac", "a_b": "s3/a, b.flac",
        "a__b": "s3/a__b.flac", "x_y": "s4/x y.flac",
    }


def test_ids_clash_after_cleaning_get_a_number(tmp_path: Path) -> None:
    root = tmp_path / "c"
    for rel in ("a b.flac", "a_b.wav"):
        write_flac(root / rel, 4000) if rel.endswith("flac") else sf.write(
            root / rel, np.zeros(4000, dtype=np.int16), 16000)
        (root / rel).with_suffix(".txt").write_text("word")
    fc.prepare_folder(root, tmp_path / "out", num_workers=1)
    rows = read_rows(tmp_path / "out" / "train.csv")
    assert {i: Path(r["wav"]).name for i, r in rows.items()} == {
        "a_b": "a b.flac", "a_b-2": "a_b.wav"
    }


# --------------------------------------------------------------------------- TSV corpus


def test_tsv_paths_speakers_and_line_reports(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    write_flac(audio / "spk7_001.flac", 4000)
    write_flac(audio / "plain.flac", 4800)
    write_flac(tmp_path / "elsewhere" / "abs.flac", 5600)
    write_flac(audio / "digits.flac", 6400)
    tsv = tmp_path / "lists" / "train.tsv"
    tsv.parent.mkdir()
    tsv.write_text(
        "path\ttext\tspeaker\n"
        "../audio/spk7_001.flac\tFirst one.\n"
        "../audio/plain.flac\tsecond\tmaria\n"
        f"{tmp_path / 'elsewhere' / 'abs.flac'}\tthird\n"
        "\n"
        "../audio/digits.flac\tRoom 101\n",
        encoding="utf-8",
    )
    result = fc.prepare_folder(tsv, tmp_path / "out", num_workers=1)
    rows = read_rows(tmp_path / "out" / "train.csv")
    assert {i: (r["duration"], r["spk_id"], r["wrd"]) for i, r in rows.items()} == {
        "spk7_001": ("0.25", "spk7", "FIRST ONE"),
        "plain": ("0.3", "maria", "SECOND"),
        "abs": ("0.35", "unknown", "THIRD"),
    }
    assert rows["plain"]["wav"] == str(audio / "plain.flac")
    assert result.left_out == [
        f"{tsv}:6: 'Room 101' contains '1' (digits: write numbers as words)"
    ]


# --------------------------------------------------------------------------- errors


def test_errors_are_listed_together_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    audio = tmp_path / "audio"
    write_flac(audio / "good.flac", 4000)
    (audio / "empty.wav").write_bytes(b"")
    (audio / "garbage.flac").write_bytes(b"this is not audio at all" * 10)
    (audio / "clip.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(64))
    tsv = tmp_path / "list.tsv"
    tsv.write_text(
        "audio/good.flac\tgood\n"
        "audio/empty.wav\tempty file\n"
        "audio/garbage.flac\tgarbage\n"
        "audio/missing.flac\tmissing\n"
        "audio/good.flac\tagain\n"
        "no tab on this line\n"
        "audio/clip.m4a\tan apple file\n"
    )
    out = tmp_path / "out"
    assert fc.main([str(tsv), "--out", str(out), "--num_workers", "1"]) == 1
    err = capsys.readouterr().err
    first, *lines = err.strip().splitlines()
    assert first == f"error: 6 problem(s) in {tsv}; no CSV was written for it:"
    assert [line.strip() for line in lines] == [
        f"{tsv}:4: audio file {audio / 'missing.flac'} does not exist",
        f"{tsv}:5: audio/good.flac is listed twice (first on line 1)",
        f"{tsv}:6: expected 'path<TAB>text' or 'path<TAB>text<TAB>speaker', got "
        "'no tab on this line'",
        f"{audio / 'empty.wav'}: empty file (0 bytes)",
        f"{audio / 'garbage.flac'}: a text file, not audio",
        f"{audio / 'clip.m4a'}: .m4a (MP4/AAC) is not a format libsndfile reads; convert it "
        f"first, e.g. ffmpeg -i {audio / 'clip.m4a'} {audio / 'clip.flac'}",
    ]
    assert not out.exists()


def test_damage_past_the_header_is_found_with_check_audio(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_flac(root / "cut.flac", 32000)
    (root / "cut.txt").write_text("cut in half")
    data = (root / "cut.flac").read_bytes()
    (root / "cut.flac").write_bytes(data[: len(data) // 2])
    assert fc.prepare_folder(root, tmp_path / "a", num_workers=1).rows == 1
    with pytest.raises(fc.FolderPrepError, match=r"cut\.flac: unreadable or corrupt audio: "
                       r"decoding failed"):
        fc.prepare_folder(root, tmp_path / "b", num_workers=1, check_audio=True)
    assert not (tmp_path / "b" / "train.csv").exists()


def test_missing_source_and_nothing_usable(tmp_path: Path) -> None:
    with pytest.raises(fc.FolderPrepError, match="does not exist: expected a folder"):
        fc.prepare_folder(tmp_path / "nope", tmp_path / "out")
    root = tmp_path / "c"
    write_flac(root / "a.flac", 4000)
    (root / "a.txt").write_text("42")
    with pytest.raises(fc.FolderPrepError, match="holds no utterance with a usable transcript "
                       r"\(1 left out, 0 unpaired"):
        fc.prepare_folder(root, tmp_path / "out", num_workers=1)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- resampling


def test_resample_converts_once_into_the_cache(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = fc.prepare_folder(corpus, tmp_path / "out", resample=cache, num_workers=1)
    assert (result.converted, result.reused, result.formats) == (2, 0, None)
    rows = read_rows(tmp_path / "out" / "train.csv")
    assert Path(rows["a1"]["wav"]) == corpus / "alice" / "a1.flac"  # already 16 kHz mono
    converted_b1 = Path(rows["b1"]["wav"])
    for utt_id, seconds in (("b1", 1.0), ("b2", 1.5)):
        converted = Path(rows[utt_id]["wav"])
        assert converted.parent == cache and converted.name.startswith(f"{utt_id}-")
        info = sf.info(converted)
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
        assert info.frames == int(seconds * 16000)
        assert float(rows[utt_id]["duration"]) == seconds
    stereo, _ = sf.read(corpus / "bob" / "b2.flac")
    mono, _ = sf.read(rows["b2"]["wav"])
    assert np.abs(mono - stereo.mean(axis=1)).max() < 2e-4  # averaged, 16-bit rounding
    mtime = converted_b1.stat().st_mtime_ns

    again = fc.prepare_folder(corpus, tmp_path / "out", resample=cache, num_workers=1)
    assert (again.converted, again.reused) == (0, 2)
    assert converted_b1.stat().st_mtime_ns == mtime
    write_flac(corpus / "bob" / "b1.flac", 12000, sample_rate=8000)  # the source changed
    changed = fc.prepare_folder(corpus, tmp_path / "out", resample=cache, num_workers=1)
    assert (changed.converted, changed.reused) == (1, 1)
    assert sf.info(converted_b1).frames == 24000
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [converted_b1.name, Path(rows["b2"]["wav"]).name, "resampled.json"])

    other = tmp_path / "other" / "bob"  # another corpus's b1.flac: its own file in the cache
    write_flac(other / "b1.flac", 4000, sample_rate=8000)
    (other / "b1.txt").write_text("the other one")
    dev = fc.prepare_folder(other, tmp_path / "out", "dev", resample=cache, num_workers=1)
    assert dev.converted == 1
    assert read_rows(tmp_path / "out" / "dev.csv")["b1"]["wav"] != str(converted_b1)
    assert sf.info(converted_b1).frames == 24000


def test_resample_failing_midway_writes_no_csv_and_keeps_what_was_converted(
    tmp_path: Path,
) -> None:
    root = tmp_path / "c"
    write_flac(root / "a.flac", 8000, sample_rate=8000)
    write_flac(root / "b.flac", 32000, sample_rate=8000)
    data = (root / "b.flac").read_bytes()
    (root / "b.flac").write_bytes(data[: len(data) // 2])  # the header still says 4 s
    for name in "ab":
        (root / f"{name}.txt").write_text("word")
    cache = tmp_path / "cache"
    with pytest.raises(fc.FolderPrepError, match=r"1 problem.*\n  .*b\.flac: .*truncated"):
        fc.prepare_folder(root, tmp_path / "out", resample=cache, num_workers=1)
    assert not (tmp_path / "out" / "train.csv").exists()
    assert sorted(p.name[:2] for p in cache.iterdir()) == ["a-", "re"]
    (root / "b.flac").unlink()
    (root / "b.txt").unlink()
    assert fc.prepare_folder(root, tmp_path / "out", resample=cache, num_workers=1).reused == 1


# --------------------------------------------------------------------------- the recipes


def test_recipe_data_reads_the_manifest(corpus: Path, tmp_path: Path) -> None:
    from mamba_asr import data

    fc.prepare_folder(corpus, tmp_path / "prep", resample=tmp_path / "cache", num_workers=1)
    hparams = {"train_csv": str(tmp_path / "prep" / "train.csv"), "data_folder": str(corpus),
               "sorting": "ascending", "avoid_if_longer_than": 1.2}
    train = data.training_set(hparams)
    assert [train.data[i]["duration"] for i in train.data_ids] == [0.75, 1.0, 1.0]
    data.add_audio_pipelines({"sample_rate": 16000, "speed_perturb": None}, None, [train])
    train.set_output_keys(["id", "sig", "wrd"])
    items = {item["id"]: item for item in train}
    assert {i: (len(item["sig"]), item["wrd"]) for i, item in items.items()} == {
        "a2": (12000, "UP DOWN AND AGAIN"), "a1": (16000, "HELLO SHE SAID IT'S THE CAFE'S WELL "
                                                   "KNOWN MENU"), "b1": (16000, "EIGHT KILOHERTZ"),
    }


@pytest.mark.slow
def test_ctc_recipe_trains_and_tests_on_prepared_manifests(tmp_path: Path) -> None:
    """The command docs/data.md gives: one epoch of the CTC demo model on a prepared folder."""
    root = tmp_path / "my_corpus"
    words = ["HELLO", "WORLD", "IT'S", "A", "TEST"]
    for split, n in (("train", 6), ("dev", 2), ("test", 2)):
        for k in range(n):
            write_flac(root / split / "spk1" / f"{split}{k}.flac", 8000 + 800 * k)
            (root / split / "spk1" / f"{split}{k}.txt").write_text(" ".join(words[: 2 + k % 3]))
        fc.prepare_folder(root / split, tmp_path / "prep", split, num_workers=1)
    prep, out = tmp_path / "prep", tmp_path / "run"
    cmd = [
        sys.executable, "train_CTC.py", "hparams/CTC/demo.yaml", "--data_folder", str(root),
        "--skip_prep", "True", "--train_csv", str(prep / "train.csv"),
        "--valid_csv", str(prep / "dev.csv"), "--test_csv", f"[{prep / 'test.csv'}]",
        "--output_folder", str(out), "--number_of_epochs", "1", "--noprogressbar",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged_epochs(out / "train_log.txt") == [1]
    assert "test set: test -" in (out / "train_log.txt").read_text()
    wer = (out / "wer_test.txt").read_text()
    assert "Scored 2 sentences, 0 not present in hyp." in wer
    assert "\ntest0, %WER" in wer and "\ntest1, %WER" in wer


def test_cli_takes_the_characters_of_hparams(tmp_path: Path, capsys) -> None:
    root = tmp_path / "c"
    write_flac(root / "a.flac", 4000)
    (root / "a.txt").write_text("Ça va, Zoë?")
    yaml_file = tmp_path / "lower.yaml"
    yaml_file.write_text('data_folder: !PLACEHOLDER\ncharacters: " abcdefghijklmnopqrstuvwxyz"\n')
    assert fc.main([str(root), "--out", str(tmp_path / "out"), "--hparams", str(yaml_file)]) == 0
    assert read_rows(tmp_path / "out" / "train.csv")["a"]["wrd"] == "ca va zoe"
    yaml_file.write_text("characters: [a, b]\n")
    assert fc.main([str(root), "--out", str(tmp_path / "o2"), "--hparams", str(yaml_file)]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "characters must be a non-empty string, not ['a', 'b']")


def test_script_exits_1_with_one_error_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "prepare_folder.py", str(tmp_path / "nope"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'nope'} does not exist: expected a folder of audio files with "
        "same-named .txt transcripts, or a TSV file of path<TAB>text lines"
    ]
