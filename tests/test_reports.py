"""Report tools on real SpeechBrain outputs (FileTrainLogger, ErrorRateStats) made in the tests."""

from __future__ import annotations

import struct
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO
from speechbrain.utils.edit_distance import wer_details_by_speaker
from speechbrain.utils.metric_stats import ErrorRateStats
from speechbrain.utils.train_logger import FileTrainLogger

from mamba_asr.reports import curves, errors, wer_table
from mamba_asr.reports._common import ReportError

# utterance id -> (reference, hypothesis); the edits are known by hand:
UTTERANCES = {
    "1089-134686-0000": ("the cat sat on the mat", "the cat sat on a mat"),  # S the->a
    "1089-134686-0001": ("hello world", "hello world"),  # correct
    "121-121726-0000": ("he went to the store", "he went to store"),  # D the
    "121-121726-0001": ("good morning", "good good morning"),  # I good
    "121-123852-0000": ("in the house", "in house"),  # D the
    "2300-131720-0000": ("one two three", "one too three"),  # S two->too
    "2300-131720-0001": ("the end", "a end extra"),  # S the->a, I extra
}
# 23 reference words, 7 errors (2 ins, 2 del, 3 sub) in 6 of 7 sentences
SPEAKERS = {"2300": (3, 5, 60.0), "121": (3, 10, 30.0), "1089": (1, 8, 12.5)}  # errors, words


def write_wer_file(path: Path, utterances: dict[str, tuple[str, str]]) -> ErrorRateStats:
    """``ErrorRateStats.write_stats`` of word-split ``utterances`` into ``path``."""
    stats = ErrorRateStats()
    ids = list(utterances)
    stats.append(
        ids,
        predict=[utterances[i][1].split() for i in ids],
        target=[utterances[i][0].split() for i in ids],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        stats.write_stats(f)
    return stats


def write_train_log(path: Path, valid_wers: list[float], test_wers: list[float]) -> None:
    """A FileTrainLogger log of len(valid_wers) epochs; epoch 3 is logged twice (resumed run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = FileTrainLogger(str(path))
    epochs = list(enumerate(valid_wers, start=1))
    for epoch, wer in epochs[:3] + [(3, valid_wers[2] + 5.0)] + epochs[3:]:
        log.log_stats(
            {"epoch": epoch, "lr": 1e-3 / epoch, "steps": 100 * epoch, "optimizer": "Adam"},
            train_stats={"loss": 3.0 / epoch},
            valid_stats={"loss": 2.5 / epoch, "ACC": 0.2 * epoch, "WER": wer, "CER": wer / 2},
            verbose=False,
        )
    for wer in test_wers:
        log.log_stats({"Epoch loaded": len(valid_wers)}, test_stats={"loss": 0.7, "WER": wer})


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# --- curves ---------------------------------------------------------------------------------


def test_read_train_log_last_epoch_wins(tmp_path):
    log = tmp_path / "train_log.txt"
    write_train_log(log, [100.0, 60.0, 45.0, 35.5], test_wers=[3.42, 8.1])
    text = log.read_text().splitlines()
    assert text[0].startswith("epoch: 1, lr: 1.00e-03, steps: 100, optimizer: Adam - train loss")
    assert "valid WER: 1.00e+02" in text[0]  # FileTrainLogger writes values >= 100 as 1.00e+02
    assert len(text) == 7 and text[5] == "Epoch loaded: 4 - test loss: 7.00e-01, test WER: 3.42"

    df = curves.read_train_log(log)
    assert df.index.name == "epoch" and df.index.tolist() == [1, 2, 3, 4]
    assert df.columns.tolist() == [
        "lr", "steps", "optimizer", "train loss", "valid loss", "valid ACC", "valid WER",
        "valid CER",
    ]
    assert df["valid WER"].tolist() == [100.0, 60.0, 50.0, 35.5]  # resumed epoch 3: last line
    assert df["valid CER"].tolist() == [50.0, 30.0, 25.0, 17.75]
    assert df["train loss"].tolist() == [3.0, 1.5, 1.0, 0.75]
    assert df["valid loss"].tolist() == [2.5, 1.25, 0.833, 0.625]  # < 1: 3 digits (8.33e-01)
    assert df["lr"].tolist() == [1e-3, 5e-4, 3.33e-4, 2.5e-4]
    assert df["steps"].tolist() == [100, 200, 300, 400] and (df["optimizer"] == "Adam").all()

    tests = curves.read_test_lines(log)
    assert tests["line"].tolist() == [6, 7]
    assert tests["test WER"].tolist() == [3.42, 8.1] and tests["Epoch loaded"].tolist() == [4, 4]


def test_parse_log_line():
    assert curves.parse_log_line("epoch: 2, lr: 8.00e-04 - train loss: 1.50") == {
        "epoch": 2,
        "lr": 8e-4,
        "train loss": 1.5,
    }
    assert curves.parse_log_line("opt: SGD, momentum 0.9 - train loss: 1") == {
        "opt": "SGD, momentum 0.9",
        "train loss": 1,
    }
    assert curves.parse_log_line("Traceback (most recent call last):") is None


def test_plot_png_and_cli_overlay(tmp_path, capsys):
    a = tmp_path / "exp_a" / "7775" / "train_log.txt"
    b = tmp_path / "exp_b" / "7775" / "train_log.txt"
    write_train_log(a, [100.0, 60.0, 45.0, 35.5], test_wers=[3.42])
    write_train_log(b, [90.0, 50.0, 30.0], test_wers=[])
    out = curves.plot_curves([("a", curves.read_train_log(a))], tmp_path / "one.png")
    assert png_size(out) == (800, 700) and out.stat().st_size > 10_000

    png = tmp_path / "plots" / "both.png"
    assert curves.main([str(a), str(b), "--out", str(png), "--logy", "--title", "t"]) == 0
    assert png_size(png) == (800, 700) and png.stat().st_size > out.stat().st_size
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "exp_a/7775: 4 epochs (1-4), best valid WER 35.50 at epoch 4, "
        "best valid CER 17.75 at epoch 4",
        "exp_b/7775: 3 epochs (1-3), best valid WER 35.00 at epoch 3, "
        "best valid CER 17.50 at epoch 3",
        f"wrote {png}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        curves.main([str(a), str(b), "--labels", "only-one"])
    assert exit_info.value.code == 2
    assert "--labels has 1 labels for 2 logs" in capsys.readouterr().err
    assert curves.default_labels([a, b]) == ["exp_a/7775", "exp_b/7775"]


def test_accuracy_is_best_highest_and_drawn_in_percent(tmp_path, capsys):
    """valid ACC (a fraction in the log, e.g. the S2S recipe's) is ranked highest-first."""
    log = tmp_path / "s2s" / "train_log.txt"
    write_train_log(log, [100.0, 60.0, 45.0, 35.5], test_wers=[])
    df = curves.read_train_log(log)
    assert curves.summary("s2s", df, ["valid ACC", "valid WER"]) == (
        "s2s: 4 epochs (1-4), best valid ACC 80.00 at epoch 4, best valid WER 35.50 at epoch 4"
    )
    png = tmp_path / "acc.png"
    assert curves.main([str(log), "--out", str(png), "--rates", "valid ACC"]) == 0
    assert png_size(png) == (800, 700)
    assert "best valid ACC 80.00 at epoch 4" in capsys.readouterr().out


def test_curves_bad_input(tmp_path, capsys):
    empty = tmp_path / "train_log.txt"
    empty.write_text("Epoch loaded: 4 - test loss: 0.70, test WER: 3.42\nsome other text\n")
    with pytest.raises(ReportError, match=r"train_log.txt: no epoch lines found \(expected "):
        curves.read_train_log(empty)
    missing = tmp_path / "nope" / "train_log.txt"
    with pytest.raises(ReportError, match=r"nope/train_log.txt: cannot read \("):
        curves.read_train_log(missing)
    binary = tmp_path / "log.bin"
    binary.write_bytes(b"\xff\xfe\x00epoch")
    with pytest.raises(ReportError, match=r"log.bin: not UTF-8 text"):
        curves.read_train_log(binary)
    bad_epoch = tmp_path / "bad_epoch.txt"
    bad_epoch.write_text("epoch: 1 - train loss: 2.00\nepoch: 1.5 - train loss: 1.00\n")
    with pytest.raises(ReportError, match=r"bad_epoch.txt:2: epoch 1.5 is not an integer"):
        curves.read_train_log(bad_epoch)
    no_columns = tmp_path / "no_columns.txt"
    no_columns.write_text("epoch: 1, lr: 1.00e-03 - train acc: 5.00e-01\n")
    assert curves.main([str(no_columns), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {no_columns}: no 'train loss', 'valid loss', 'valid WER'")
    assert curves.main([str(empty), "--out", str(tmp_path / "x.png")]) == 1
    assert f"error: {empty}: no epoch lines found" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# --- errors ---------------------------------------------------------------------------------


@pytest.fixture
def wer_file(tmp_path) -> tuple[Path, ErrorRateStats]:
    path = tmp_path / "wer_test-clean.txt"
    return path, write_wer_file(path, UTTERANCES)


def test_alignments_match_speechbrain(wer_file):
    path, stats = wer_file
    text = path.read_text()
    assert text.startswith("%WER 30.43 [ 7 / 23, 2 ins, 2 del, 3 sub ]\n%SER 85.71 [ 6 / 7 ]\n")
    assert "Format:" in text  # the example block (1 ins, 2 sub, 1 del) must not be counted
    utts = errors.read_alignments(path)
    assert [u.key for u in utts] == list(UTTERANCES)
    first = utts[0]
    assert (first.words, first.ins, first.dels, first.subs, first.wer) == (6, 0, 0, 1, 16.67)
    assert first.ops[4] == ("S", "the", "a") and first.ops[0] == ("=", "the", "the")
    assert utts[2].ops[3] == ("D", "the", None)
    assert [op for op, _, _ in utts[6].ops] == ["S", "=", "I"] and utts[6].ops[2][2] == "extra"
    for utt, dets in zip(utts, stats.scores, strict=True):
        assert (utt.ins, utt.dels, utt.subs) == (
            dets["insertions"],
            dets["deletions"],
            dets["substitutions"],
        )


def test_top_errors_and_speakers(wer_file):
    utts = errors.read_alignments(wer_file[0])
    tables = errors.top_errors(utts, top=20)
    assert tables["substitutions"].values.tolist() == [["the", "a", 2], ["two", "too", 1]]
    assert tables["insertions"].values.tolist() == [["extra", 1], ["good", 1]]
    assert tables["deletions"].values.tolist() == [["the", 2]]
    assert errors.top_errors(utts, top=1)["insertions"].values.tolist() == [["extra", 1]]

    spk = errors.speaker_wer(utts)
    assert spk["speaker"].tolist() == ["2300", "121", "1089"]  # highest WER first
    for row in spk.itertuples(index=False):
        assert (row.errors, row.words, row.WER) == SPEAKERS[row.speaker]
    assert spk["sentences"].tolist() == [2, 3, 2] and spk["ins"].tolist() == [1, 1, 0]
    # the same numbers as SpeechBrain's own per-speaker summary
    utt2spk = {key: key.split("-")[0] for key in UTTERANCES}
    sb = {d["speaker"]: d for d in wer_details_by_speaker(wer_file[1].scores, utt2spk)}
    for row in spk.itertuples(index=False):
        assert row.WER == pytest.approx(sb[row.speaker]["WER"])
        assert row.errors == sb[row.speaker]["num_edits"]

    by_chapter = errors.speaker_wer(utts, r"^[^-]+-[^-]+")
    assert dict(zip(by_chapter["speaker"], by_chapter["WER"].round(2), strict=True)) == {
        "2300-131720": 60.0,
        "121-123852": 33.33,
        "121-121726": 28.57,
        "1089-134686": 12.5,
    }
    assert errors.speaker_of("1089-134686-0000", r"^\d+-(\d+)") == "134686"  # group 1
    with pytest.raises(ReportError, match=r"does not match utterance id '1089-134686-0000'"):
        errors.speaker_wer(utts, r"^spk")


def test_errors_cli(wer_file, capsys):
    path = wer_file[0]
    assert errors.main([str(path), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: %WER 30.43 [ 7 / 23, 2 ins, 2 del, 3 sub ] over 7 sentences")
    assert "## top 1 substitutions (ref -> hyp)" in out and "| the | a   |     2 |" in out
    assert "| two" not in out and "| extra |     1 |" in out and "| good" not in out
    assert "| 2300    | 60.00 |      3 |   1 |   0 |   2 |     5 |         2 |" in out
    assert out.endswith("| 1089    | 12.50 |      1 |   0 |   0 |   1 |     8 |         2 |\n")

    assert errors.main([str(path), "--csv", "--top", "0"]) == 0
    df = pd.read_csv(StringIO(capsys.readouterr().out), keep_default_na=False)
    assert df["section"].tolist() == ["substitution"] * 2 + ["insertion"] * 2 + [
        "deletion",
        "speaker",
        "speaker",
        "speaker",
    ]
    assert df.iloc[0][["ref", "hyp", "count"]].tolist() == ["the", "a", 2]
    speakers = df[df["section"] == "speaker"]
    assert speakers["speaker"].astype(str).tolist() == ["2300", "121", "1089"]
    assert speakers["WER"].astype(float).tolist() == [60.0, 30.0, 12.5]


def test_errors_bad_input(tmp_path, wer_file, capsys):
    path = wer_file[0]
    summary_only = tmp_path / "wer_summary.txt"
    summary_only.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(ReportError, match=r"wer_summary.txt: no ALIGNMENTS section"):
        errors.read_alignments(summary_only)
    tampered = tmp_path / "wer_tampered.txt"
    text = path.read_text().replace("1 / 6, 0 ins, 0 del, 1 sub", "1 / 6, 0 ins, 1 del, 0 sub")
    tampered.write_text(text)
    with pytest.raises(ReportError, match=r"1089-134686-0000 has 0 ins, 1 del, 0 sub, 6 words"):
        errors.read_alignments(tampered)
    assert errors.main([str(tmp_path / "train_log.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'train_log.txt'}: cannot read (")
    assert "ErrorRateStats.write_stats" in err


# --- wer_table ------------------------------------------------------------------------------


@pytest.fixture
def results(tmp_path) -> Path:
    """results/{exp_a/7775 (two test sets, train_log), exp_b (one test set, a broken file)}."""
    root = tmp_path / "results"
    write_wer_file(root / "exp_a" / "7775" / "wer_test-clean.txt", UTTERANCES)
    other = {"1-1-1": ("a b c d", "a b c d"), "2-2-2": ("x y", "x")}  # 1 del in 6 words
    write_wer_file(root / "exp_a" / "7775" / "wer_test-other.txt", other)
    write_train_log(root / "exp_a" / "7775" / "train_log.txt", [80.0, 60.0, 40.0], [30.43, 16.67])
    write_wer_file(root / "exp_b" / "wer_test-clean.txt", {"3-3-3": ("a", "b")})
    (root / "exp_b" / "wer_broken.txt").write_text("")  # e.g. an evaluation still running
    return root


def test_wer_table_rows(results, capsys):
    df = wer_table.wer_table([results])
    assert "warning: skipped" in capsys.readouterr().err
    assert df[wer_table.COLUMNS].values.tolist() == [
        ["exp_a/7775", "test-clean", 30.43, 85.71, 2, 2, 3, 23, 7],
        ["exp_a/7775", "test-other", 16.67, 50.0, 0, 1, 0, 6, 2],
        ["exp_b", "test-clean", 100.0, 100.0, 0, 0, 1, 1, 1],
    ]
    assert not df["partial"].any() and df["absent"].tolist() == [0, 0, 0]

    both = wer_table.wer_table([results / "exp_a", results / "exp_b"], train_log=True)
    assert both["experiment"].tolist() == ["exp_a/7775"] * 4 + ["exp_b"]
    assert both["test_set"].tolist()[2:4] == ["train_log #1 (epoch 3)", "train_log #2 (epoch 3)"]
    assert both["WER"].tolist()[2:4] == [30.43, 16.67]  # train_log lines have only the WER
    assert both["words"].isna().tolist() == [False, False, True, True, False]
    assert wer_table.wer_table([results / "exp_b"])["experiment"].tolist() == ["exp_b"]


def test_wer_table_cli(results, capsys):
    assert wer_table.main([str(results)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "| experiment | test_set   |    WER |    SER | ins | del | sub | words | sentences |",
        "| ---------- | ---------- | -----: | -----: | --: | --: | --: | ----: | --------: |",
        "| exp_a/7775 | test-clean |  30.43 |  85.71 |   2 |   2 |   3 |    23 |         7 |",
        "| exp_a/7775 | test-other |  16.67 |  50.00 |   0 |   1 |   0 |     6 |         2 |",
        "| exp_b      | test-clean | 100.00 | 100.00 |   0 |   0 |   1 |     1 |         1 |",
    ]
    assert captured.err.startswith(f"warning: skipped {results / 'exp_b' / 'wer_broken.txt'}: ")

    assert wer_table.main([str(results), "--csv"]) == 0
    df = pd.read_csv(StringIO(capsys.readouterr().out))
    assert df.columns.tolist() == [*wer_table.COLUMNS, "absent", "partial", "file"]
    assert df["WER"].tolist() == [30.43, 16.67, 100.0] and df["words"].tolist() == [23, 6, 1]

    assert wer_table.main([str(results), "--strict"]) == 1
    assert "wer_broken.txt: line 1 is not a WER summary line" in capsys.readouterr().err
    assert wer_table.main([str(results / "missing")]) == 1
    assert "missing: not a folder" in capsys.readouterr().err
    assert wer_table.main([str(results), "--pattern", "cer_*.txt"]) == 1
    assert "no cer_*.txt files found under" in capsys.readouterr().err


def test_partial_header():
    text = (
        "%WER 10.00 [ 1 / 10, 0 ins, 1 del, 0 sub ] [PARTIAL]\n%SER 50.00 [ 1 / 2 ]\n"
        "Scored 2 sentences, 1 not present in hyp.\n"
    )
    stats = wer_table.parse_wer_header(text)
    assert stats["partial"] and stats["absent"] == 1 and stats["sentences"] == 2
    assert (stats["WER"], stats["del"], stats["words"]) == (10.0, 1, 10)


@pytest.mark.parametrize("tool", ["curves", "wer_table", "errors"])
def test_module_help(tool):
    res = subprocess.run(
        [sys.executable, "-m", f"mamba_asr.reports.{tool}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:")
