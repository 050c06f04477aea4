"""librispeech_prepare: manifests, bad input, idempotency, atomicity."""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from conftest import REPO, make_librispeech, write_flac

from mamba_asr import librispeech as lp
from mamba_asr.audio_info import AudioHeaderError, count_decoded_frames, read_audio_info

SPLITS = {
    "tr_splits": ["train-clean-100"],
    "dev_splits": ["dev-clean"],
    "te_splits": ["test-clean"],
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["ID", "duration", "wav", "spk_id", "wrd"]
        return list(reader)


def file_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


# --------------------------------------------------------------------------- contents


def test_manifests_match_tree(small_tree, tmp_path):
    root, expected = small_tree
    counts = lp.prepare_librispeech(
        root, tmp_path / "out", **SPLITS, merge_lst=["train-clean-100"], merge_name="train.csv"
    )
    assert counts == {
        "train-clean-100.csv": 7,
        "dev-clean.csv": 3,
        "test-clean.csv": 4,
        "train.csv": 7,
    }
    for split, utts in expected.items():
        rows = read_csv(tmp_path / "out" / f"{split}.csv")
        assert [r["ID"] for r in rows] == sorted(utts, key=lambda u: [int(x) for x in u.split("-")])
        for r in rows:
            n_samples, text = utts[r["ID"]]
            assert float(r["duration"]) == n_samples / 16000
            assert r["wrd"] == text
            assert r["spk_id"] == "-".join(r["ID"].split("-")[:2])
            assert Path(r["wav"]).is_absolute()
            assert Path(r["wav"]) == root / "LibriSpeech" / split / Path(
                *r["ID"].split("-")[:2]
            ) / (r["ID"] + ".flac")
    merged = read_csv(tmp_path / "out" / "train.csv")
    assert merged == read_csv(tmp_path / "out" / "train-clean-100.csv")


def test_data_folder_may_be_librispeech_itself(small_tree, tmp_path):
    root, _ = small_tree
    lp.prepare_librispeech(root, tmp_path / "a", **SPLITS)
    lp.prepare_librispeech(root / "LibriSpeech", tmp_path / "b", **SPLITS)
    for split in ["train-clean-100", "dev-clean", "test-clean"]:
        assert (tmp_path / "a" / f"{split}.csv").read_bytes() == (
            tmp_path / "b" / f"{split}.csv"
        ).read_bytes()


def test_data_root_placeholder(small_tree, tmp_path):
    root, _ = small_tree
    lp.prepare_librispeech(
        root, tmp_path / "out", tr_splits=["dev-clean"], data_root_placeholder=True
    )
    rows = read_csv(tmp_path / "out" / "dev-clean.csv")
    assert rows[0]["wav"] == "$data_root/dev-clean/84/121123/84-121123-0000.flac"
    base = lp.librispeech_root(root)
    assert base == root / "LibriSpeech"
    assert all((base / r["wav"].replace("$data_root/", "")).is_file() for r in rows)


def test_select_n_sentences_one_per_split(small_tree, tmp_path):
    root, _ = small_tree
    counts = lp.prepare_librispeech(root, tmp_path / "out", **SPLITS, select_n_sentences=[5, 1, 2])
    assert counts == {"train-clean-100.csv": 5, "dev-clean.csv": 1, "test-clean.csv": 2}
    with pytest.raises(lp.LibriSpeechPrepError, match="one number per split"):
        lp.prepare_librispeech(root, tmp_path / "o2", **SPLITS, select_n_sentences=[5, 1])


def test_audio_info_matches_decoded_length(tmp_path):
    for n, sr, ch in [(1, 16000, 1), (16001, 16000, 1), (12345, 22050, 2), (70000, 8000, 1)]:
        write_flac(tmp_path / f"{n}.flac", n, sr, ch)
        info = read_audio_info(str(tmp_path / f"{n}.flac"))
        data, rate = sf.read(tmp_path / f"{n}.flac")
        assert (info.num_frames, info.sample_rate, info.channels) == (len(data), sr, ch)
    wav = tmp_path / "x.wav"
    sf.write(wav, [0.0] * 321, 16000)
    assert read_audio_info(str(wav)).num_frames == 321
    (tmp_path / "empty.flac").write_bytes(b"")
    with pytest.raises(AudioHeaderError, match="zero-length"):
        read_audio_info(str(tmp_path / "empty.flac"))


def test_count_decoded_frames_stops_where_decoding_stops(tmp_path):
    """soundfile.blocks pads a short read up to the header's count with stale samples."""
    sf.write(tmp_path / "full.mp3", [0.5, -0.5] * 8000, 16000)
    mp3 = (tmp_path / "full.mp3").read_bytes()
    (tmp_path / "cut.mp3").write_bytes(mp3[: len(mp3) // 2])
    decoded = len(sf.read(tmp_path / "cut.mp3")[0])
    assert decoded < sf.info(tmp_path / "cut.mp3").frames == 16000
    assert count_decoded_frames(str(tmp_path / "cut.mp3")) == decoded


# --------------------------------------------------------------------------- bad input


def _prepare_expecting(root: Path, out: Path, match: str, split: str = "train-clean-100"):
    with pytest.raises(lp.LibriSpeechPrepError, match=match) as info:
        lp.prepare_librispeech(root, out, tr_splits=[split], num_workers=1)
    assert not (out / f"{split}.csv").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name] if out.exists() else True
    return str(info.value)


def test_missing_data_folder(tmp_path):
    msg = _prepare_expecting(tmp_path / "nowhere", tmp_path / "out", "does not exist")
    assert str(tmp_path / "nowhere") in msg


def test_missing_split_lists_present_ones(small_tree, tmp_path):
    root, _ = small_tree
    msg = _prepare_expecting(root, tmp_path / "out", "does not exist", split="train-other-500")
    assert "train-other-500" in msg and "dev-clean, test-clean, train-clean-100" in msg


def test_folder_without_librispeech(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = _prepare_expecting(tmp_path / "empty", tmp_path / "out", "does not exist")
    assert "holds no split folders" in msg


CHAPTER = Path("LibriSpeech/train-clean-100/19/198")
TRANS = CHAPTER / "19-198.trans.txt"


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda r: (r / TRANS).unlink(), r"4 audio files but no <speaker>-<chapter>\.trans\.txt"),
        (
            lambda r: (r / CHAPTER / "19-198-0002.flac").unlink(),
            r"19-198-0002 has no audio file \(expected .*19-198-0002\.flac",
        ),
        (
            lambda r: (r / TRANS).write_bytes(b"19-198-0000 HELLO\n19-198-0001 CAF\xe9\n"),
            r"19-198\.trans\.txt:2: transcript is not valid UTF-8",
        ),
        (
            lambda r: (r / TRANS).write_text("19-198-0000\n"),
            r"trans\.txt:1: utterance 19-198-0000 has no words",
        ),
        (lambda r: (r / TRANS).write_text("19-199-0000 HELLO\n"), r"trans\.txt:1: malformed"),
        (lambda r: (r / TRANS).write_text("19-198-0000 Hello world\n"), r"characters 'delorw'"),
        (
            lambda r: (r / TRANS).write_text("19-198-0000 A\n19-198-0000 B\n"),
            r"trans\.txt:2: duplicate utterance ID 19-198-0000",
        ),
        (lambda r: (r / CHAPTER / "19-198-0001.flac").write_bytes(b""), r"0001\.flac.*zero-length"),
        (
            lambda r: (r / CHAPTER / "19-198-0001.flac").write_bytes(b"RIFFnot audio at all" * 9),
            r"0001\.flac: unreadable or corrupt audio",
        ),
        (
            lambda r: (r / CHAPTER / "19-198-0001.flac").write_bytes(b"fLaC\x00\x00"),
            r"0001\.flac.*truncated FLAC header",
        ),
        (
            lambda r: _replace_with_link(r / CHAPTER / "19-198-0001.flac"),
            r"0001\.flac: unreadable or corrupt audio: No such file",
        ),
        (
            lambda r: write_flac(r / CHAPTER / "19-198-0001.flac", 9000, sample_rate=22050),
            r"0001\.flac: expected 16000 Hz mono audio, found 22050 Hz",
        ),
        (
            lambda r: write_flac(r / CHAPTER / "19-198-0001.flac", 9000, channels=2),
            r"found 16000 Hz with 2 channel",
        ),
    ],
    ids=[
        "no-trans",
        "missing-audio",
        "non-utf8",
        "no-words",
        "wrong-id",
        "lowercase",
        "duplicate",
        "zero-length",
        "not-audio",
        "truncated",
        "unreadable",
        "sample-rate",
        "stereo",
    ],
)
def test_bad_input_is_an_error_naming_the_file(small_tree, tmp_path, damage, match):
    root, _ = small_tree
    damage(root)
    _prepare_expecting(root, tmp_path / "out", match)


def _replace_with_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("gone.flac"))


def test_empty_split(tmp_path):
    (tmp_path / "LibriSpeech" / "train-clean-100" / "19" / "198").mkdir(parents=True)
    _prepare_expecting(tmp_path, tmp_path / "out", "holds no transcribed .flac utterances")


def test_all_problems_are_listed_together(small_tree, tmp_path):
    root, _ = small_tree
    for utt in range(3):
        (root / CHAPTER / f"19-198-000{utt}.flac").write_bytes(b"")
    msg = _prepare_expecting(root, tmp_path / "out", "3 problem")
    assert msg.count("zero-length") == 3


def test_audio_without_transcript_is_skipped_and_counted(small_tree, tmp_path, caplog):
    root, _ = small_tree
    write_flac(root / CHAPTER / "19-198-0009.flac", 5000)
    with caplog.at_level(logging.WARNING):
        counts = lp.prepare_librispeech(root, tmp_path / "out", tr_splits=["train-clean-100"])
    assert counts["train-clean-100.csv"] == 7
    assert "skipped 1 audio file(s) without a transcript" in caplog.text
    assert "19-198-0009.flac" in caplog.text
    record = json.loads((tmp_path / "out" / lp.RECORD_FILE).read_text())
    assert record["files"]["train-clean-100.csv"]["skipped"] == 1


def test_check_audio_finds_damage_past_the_header(small_tree, tmp_path):
    root, _ = small_tree
    audio = root / CHAPTER / "19-198-0001.flac"
    audio.write_bytes(audio.read_bytes()[:200])  # header intact, frames cut off
    lp.prepare_librispeech(root, tmp_path / "ok", tr_splits=["train-clean-100"])
    with pytest.raises(lp.LibriSpeechPrepError, match="0001.flac: unreadable or corrupt"):
        lp.prepare_librispeech(
            root, tmp_path / "out", tr_splits=["train-clean-100"], check_audio=True
        )


def test_lexicon_from_local_path_or_clear_error(small_tree, tmp_path):
    root, _ = small_tree
    with pytest.raises(lp.LibriSpeechPrepError, match="nothing is downloaded.*librispeech-lexicon"):
        lp.prepare_librispeech(root, tmp_path / "out", tr_splits=["dev-clean"], create_lexicon=True)
    lexicon = tmp_path / "lex.txt"
    lexicon.write_text("".join(f"W{i} W AH1 N{i % 3}\n" for i in range(200)))
    lp.prepare_librispeech(
        root, tmp_path / "out", tr_splits=["dev-clean"], create_lexicon=str(lexicon)
    )
    rows = list(csv.reader(open(tmp_path / "out" / "lexicon.csv")))
    assert rows[0] == ["ID", "duration", "char", "phn"] and len(rows) == 201
    assert rows[1] == ["0", "2", "W 0", "W AH N"]
    parts = [
        len(list(csv.reader(open(tmp_path / "out" / f"lexicon_{s}.csv")))) - 1
        for s in ("tr", "dev", "test")
    ]
    assert parts == [196, 2, 2]


# --------------------------------------------------------------------------- idempotency


def test_second_run_opens_no_audio_and_rewrites_nothing(small_tree, tmp_path, monkeypatch):
    root, _ = small_tree
    out = tmp_path / "out"
    kwargs = dict(**SPLITS, merge_lst=["train-clean-100"], merge_name="train.csv")
    first = lp.prepare_librispeech(root, out, **kwargs)
    before = file_state(out)

    def forbidden(*args, **kw):
        raise AssertionError("audio was opened on an idempotent re-run")

    monkeypatch.setattr(lp, "read_audio_info", forbidden)
    monkeypatch.setattr(lp, "read_headers", forbidden)
    monkeypatch.setattr(lp, "_scan_split", forbidden)
    assert lp.prepare_librispeech(root, out, **kwargs) == first
    assert file_state(out) == before


def _csv_states(out: Path) -> dict[str, tuple[int, int]]:
    return {k: v for k, v in file_state(out).items() if k.endswith(".csv")}


def test_changed_options_reprepare(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    lp.prepare_librispeech(root, out, tr_splits=["train-clean-100"])
    first = _csv_states(out)

    # more splits: only the new one is written
    lp.prepare_librispeech(root, out, tr_splits=["train-clean-100"], dev_splits=["dev-clean"])
    states = _csv_states(out)
    assert states["train-clean-100.csv"] == first["train-clean-100.csv"]
    assert len(read_csv(out / "dev-clean.csv")) == 3

    # select_n_sentences changes the rows
    assert lp.prepare_librispeech(
        root, out, tr_splits=["train-clean-100"], select_n_sentences=[2]
    ) == {"train-clean-100.csv": 2}
    assert len(read_csv(out / "train-clean-100.csv")) == 2

    # another data folder: paths follow it
    moved = tmp_path / "moved"
    shutil.copytree(root, moved, symlinks=True)
    lp.prepare_librispeech(moved, out, tr_splits=["train-clean-100"])
    rows = read_csv(out / "train-clean-100.csv")
    assert len(rows) == 7 and all(r["wav"].startswith(str(moved)) for r in rows)

    # a CSV edited or deleted by hand is rebuilt
    (out / "dev-clean.csv").write_text("ID,duration,wav,spk_id,wrd\n")
    lp.prepare_librispeech(root, out, dev_splits=["dev-clean"])
    assert len(read_csv(out / "dev-clean.csv")) == 3


def test_changed_split_content_of_merge_is_remerged(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    kw = dict(
        tr_splits=["train-clean-100", "dev-clean"],
        merge_lst=["train-clean-100", "dev-clean"],
        merge_name="train.csv",
    )
    lp.prepare_librispeech(root, out, **kw)
    assert len(read_csv(out / "train.csv")) == 10
    lp.prepare_librispeech(root, out, **kw, select_n_sentences=[1, 1])
    assert [r["ID"] for r in read_csv(out / "train.csv")] == ["19-198-0000", "84-121123-0000"]


# --------------------------------------------------------------------------- atomicity


def test_interrupted_write_leaves_no_csv(small_tree, tmp_path, monkeypatch):
    root, _ = small_tree
    out = tmp_path / "out"
    real_writer = csv.writer

    class Failing:
        def __init__(self, f, **kw):
            self.inner, self.n = real_writer(f, **kw), 0

        def writerow(self, row):
            self.n += 1
            if self.n == 4:
                raise KeyboardInterrupt
            self.inner.writerow(row)

    monkeypatch.setattr(lp.csv, "writer", Failing)
    with pytest.raises(KeyboardInterrupt):
        lp.prepare_librispeech(root, out, tr_splits=["train-clean-100"])
    assert sorted(p.name for p in out.iterdir()) == []
    monkeypatch.undo()
    assert lp.prepare_librispeech(root, out, tr_splits=["train-clean-100"]) == {
        "train-clean-100.csv": 7
    }


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_killed_runs_never_leave_a_partial_csv(tmp_path):
    root = tmp_path / "corpus"
    spec = {f"split-{s}": {(100 + i, 1000 + i): 40 for i in range(15)} for s in range(3)}
    make_librispeech(root, spec)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "librispeech_prepare.py"),
        "--data_folder",
        str(root),
        "--save_folder",
        str(out),
        "--tr_splits",
        *spec,
        "--num_workers",
        "2",
        "--quiet",
        "--merge_lst",
        *spec,
        "--merge_name",
        "train.csv",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    subprocess.run([*cmd[:5], str(tmp_path / "timing"), *cmd[6:]], env=env, check=True)
    full = time.monotonic() - start
    killed = 0
    for fraction in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=fraction * full)
        except subprocess.TimeoutExpired:
            proc.kill()
            killed += proc.wait() == -signal.SIGKILL
        for name in [*(f"{s}.csv" for s in spec), "train.csv"]:
            if (out / name).exists():
                assert len(read_csv(out / name)) == (600 if name != "train.csv" else 1800)
        if fraction == 0.5:
            shutil.rmtree(out, ignore_errors=True)
    assert killed >= 2  # later runs reuse finished CSVs, so they may end before the kill
    deadline = time.monotonic() + 5
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(out)) == [], "worker processes outlived their killed parent"
    subprocess.run(cmd, env=env, check=True)
    assert all(len(read_csv(out / f"{s}.csv")) == 600 for s in spec)
    assert len(read_csv(out / "train.csv")) == 1800
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(
                errors="replace"
            ):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


# --------------------------------------------------------------------------- CLI + demo corpus


def test_cli_help():
    res = subprocess.run(
        [sys.executable, "librispeech_prepare.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--data_folder" in res.stdout and "--select_n_sentences" in res.stdout


def test_top_level_entry_keeps_speechbrains_function():
    """``librispeech_prepare.py`` is the entry SpeechBrain recipes import from; its function
    takes SpeechBrain's LibriSpeech arguments, in SpeechBrain's order, first."""
    import librispeech_prepare

    assert librispeech_prepare.prepare_librispeech is lp.prepare_librispeech
    assert librispeech_prepare.LibriSpeechPrepError is lp.LibriSpeechPrepError
    params = list(inspect.signature(librispeech_prepare.prepare_librispeech).parameters)
    assert params[:10] == [
        "data_folder", "save_folder", "tr_splits", "dev_splits", "te_splits",
        "select_n_sentences", "merge_lst", "merge_name", "create_lexicon", "skip_prep",
    ]


def test_cli_error_exit(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "librispeech_prepare.py",
            "--data_folder",
            str(tmp_path / "x"),
            "--save_folder",
            str(tmp_path / "o"),
            "--tr_splits",
            "train-clean-100",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "error: data folder" in res.stderr


DEMO_SPLITS = ["train-clean-100", "dev-clean", "test-clean", "test-other"]


def test_api_on_demo_corpus(demo_corpus, tmp_path):
    counts = lp.prepare_librispeech(
        demo_corpus,
        tmp_path / "out",
        tr_splits=DEMO_SPLITS[:1],
        dev_splits=DEMO_SPLITS[1:2],
        te_splits=DEMO_SPLITS[2:],
    )
    root = demo_corpus / "LibriSpeech"
    for split in DEMO_SPLITS:
        audio = {p.stem: p for p in (root / split).rglob("*.flac")}
        texts = {}
        for trans in (root / split).rglob("*.trans.txt"):
            for line in trans.read_text().splitlines():
                utt, text = line.split(" ", 1)
                texts[utt] = text
        rows = read_csv(tmp_path / "out" / f"{split}.csv")
        assert counts[f"{split}.csv"] == len(rows) == len(audio) == len(texts) > 0
        for r in rows:
            assert Path(r["wav"]) == audio[r["ID"]].absolute()
            assert r["wrd"] == texts[r["ID"]]
            assert r["spk_id"] == r["ID"].rsplit("-", 1)[0]
        for r in rows[:: max(1, len(rows) // 200)]:
            assert float(r["duration"]) == len(sf.read(r["wav"], dtype="int16")[0]) / 16000


def test_cli_on_demo_corpus(demo_corpus, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "librispeech_prepare.py",
            "--data_folder",
            str(demo_corpus / "LibriSpeech"),
            "--save_folder",
            str(out),
            "--tr_splits",
            "train-clean-100",
            "--te_splits",
            "test-clean",
            "--merge_lst",
            "train-clean-100",
            "--merge_name",
            "train.csv",
            "--data_root_placeholder",
            "--num_workers",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "train.csv" in res.stdout and "hours" in res.stdout
    train = read_csv(out / "train.csv")
    assert train == read_csv(out / "train-clean-100.csv")
    assert all(r["wav"].startswith("$data_root/train-clean-100/") for r in train)
    record = json.loads((out / lp.RECORD_FILE).read_text())
    assert record["files"]["train.csv"]["rows"] == len(train)


def test_manifest_loads_in_speechbrain_with_data_root(small_tree, tmp_path):
    """What the recipes do: DynamicItemDataset.from_csv with the $data_root replacement."""
    import speechbrain as sb

    root, expected = small_tree
    lp.prepare_librispeech(
        root, tmp_path / "out", te_splits=["test-clean"], data_root_placeholder=True
    )
    data = sb.dataio.dataset.DynamicItemDataset.from_csv(
        tmp_path / "out" / "test-clean.csv",
        replacements={"data_root": str(lp.librispeech_root(root))},
    )

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    data.add_dynamic_item(audio_pipeline)
    data.set_output_keys(["id", "sig", "duration", "wrd"])
    items = list(data)
    assert [x["id"] for x in items] == sorted(expected["test-clean"], key=lp._sort_key)
    for x in items:
        n_samples, text = expected["test-clean"][x["id"]]
        assert x["sig"].shape == (n_samples,) and x["duration"] * 16000 == n_samples
        assert x["wrd"] == text
