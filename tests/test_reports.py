"""Report tools on real SpeechBrain outputs (FileTrainLogger, ErrorRateStats) made in the tests."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO
from speechbrain.utils.edit_distance import wer_details_by_utterance
from speechbrain.utils.metric_stats import ErrorRateStats
from speechbrain.utils.train_logger import FileTrainLogger

from mamba_asr.reports import curves, errors, wer_table
from mamba_asr.reports._common import ReportError
from mamba_asr.reports.scores import read_scores, scores_path, write_scores

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


def write_wer_file(
    path: Path, utterances: dict[str, tuple[str, str]]
) -> tuple[ErrorRateStats, ErrorRateStats]:
    """What a recipe writes for word-split ``utterances``: ``ErrorRateStats.write_stats``
    into ``path`` (``wer_<set>.txt``) and the WER and CER (characters) scores beside it."""
    wer, cer = ErrorRateStats(), ErrorRateStats(split_tokens=True)
    ids = list(utterances)
    for stats in (wer, cer):
        stats.append(
            ids,
            predict=[utterances[i][1].split() for i in ids],
            target=[utterances[i][0].split() for i in ids],
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        wer.write_stats(f)
    write_scores(scores_path(path), path.stem[len("wer_"):], {"WER": wer, "CER": cer})
    return wer, cer


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


def test_training_statistics_are_read_and_drawn(tmp_path, capsys):
    """The recipes' epoch lines with the training monitor's fields (a 2-process epoch, then a
    resumed one-process epoch): numbers read as numbers, ``--stats`` draws one panel each."""
    log = tmp_path / "train_log.txt"
    logger = FileTrainLogger(str(log))
    for epoch, rate, eta in ((1, "41.3 40.9", "0:01:10"), (2, 80.5, "0:00:00")):
        meta = {"epoch": epoch, "lr": 1e-3, "steps": 10 * epoch, "skipped_steps": 0,
                "grad_norm_mean": 0.8 * epoch, "grad_norm_max": 2.5 * epoch,
                "clipped_steps": epoch, "audio_s_per_s": rate, "audio_s_per_s_total": 82.2,
                "peak_mem_gb": 0.85, "eta": eta}
        logger.log_stats(meta, train_stats={"loss": 3.0 / epoch},
                         valid_stats={"loss": 2.0 / epoch, "WER": 90.0}, verbose=False)
    df = curves.read_train_log(log)
    assert df["grad_norm_mean"].tolist() == [0.8, 1.6] and df["grad_norm_max"].tolist() == [2.5, 5]
    assert df["clipped_steps"].tolist() == [1, 2] and df["eta"].tolist() == ["0:01:10", "0:00:00"]
    assert df["audio_s_per_s"].tolist() == ["41.3 40.9", 80.5]
    assert df["audio_s_per_s_total"].tolist() == [82.2, 82.2] and df["peak_mem_gb"].tolist() == [
        0.85, 0.85]
    png = tmp_path / "stats.png"
    stats = ["grad_norm_max", "audio_s_per_s_total", "peak_mem_gb"]
    assert curves.main([str(log), "--out", str(png), "--stats", *stats]) == 0
    assert png_size(png) == (800, 700 + 3 * 220)
    assert curves.main([str(log), "--out", str(png), "--stats", "tokens_per_s"]) == 1
    assert "no 'tokens_per_s' in its epoch lines" in capsys.readouterr().err


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


# --- scores and errors ---------------------------------------------------------------------


@pytest.fixture
def wer_file(tmp_path) -> tuple[Path, ErrorRateStats]:
    path = tmp_path / "wer_test-clean.txt"
    return path, write_wer_file(path, UTTERANCES)[0]


def test_scores_json_holds_speechbrain_scores(wer_file):
    path, stats = wer_file
    json_path = path.with_suffix(".json")
    assert scores_path(path) == json_path and scores_path(json_path) == json_path
    doc = json.loads(json_path.read_text())
    assert doc["version"] == 1 and doc["test_set"] == "test-clean"
    wer = doc["WER"]
    assert wer["summary"] == {
        "WER": pytest.approx(100 * 7 / 23), "SER": pytest.approx(100 * 6 / 7), "num_edits": 7,
        "num_scored_tokens": 23, "num_erroneous_sents": 6, "num_scored_sents": 7,
        "num_absent_sents": 0, "num_ref_sents": 7, "insertions": 2, "deletions": 2,
        "substitutions": 3,
    }
    first = wer["utterances"][0]
    assert first["key"] == "1089-134686-0000" and first["num_edits"] == 1
    assert first["ref_tokens"] == "the cat sat on the mat".split()
    assert first["hyp_tokens"] == "the cat sat on a mat".split()
    assert first["alignment"][4] == ["S", 4, 4]
    # CER: counts per utterance, no character alignment; "the end" -> "a end extra": 8 edits
    cer = doc["CER"]
    assert [u["num_edits"] for u in cer["utterances"]] == [3, 0, 4, 5, 4, 1, 8]
    assert [u["num_ref_tokens"] for u in cer["utterances"]] == [22, 11, 20, 12, 12, 13, 7]
    assert "alignment" not in cer["utterances"][0] and cer["summary"]["num_edits"] == 25
    # read back, the txt or the JSON: what SpeechBrain computed, alignments included
    for given in (path, json_path):
        read = read_scores(given)["WER"]["utterances"]
        assert [u["key"] for u in read] == list(UTTERANCES)
        for ours, dets in zip(read, stats.scores, strict=True):
            assert [tuple(a) for a in ours["alignment"]] == dets["alignment"]
            assert {k: v for k, v in ours.items() if k != "alignment"} == {
                k: v for k, v in dets.items() if k != "alignment"
            }
    utts = read_scores(path)["WER"]["utterances"]
    assert list(errors.edits(utts[0]))[4] == ("S", "the", "a")
    assert list(errors.edits(utts[0]))[0] == ("=", "the", "the")
    assert list(errors.edits(utts[2]))[3] == ("D", "the", None)
    assert list(errors.edits(utts[6])) == [("S", "the", "a"), ("=", "end", "end"),
                                           ("I", None, "extra")]


def test_top_errors_and_speakers(wer_file):
    utts = read_scores(wer_file[0])["WER"]["utterances"]
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
    assert spk["del"].tolist() == [0, 2, 0] and spk["sub"].tolist() == [2, 0, 1]

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
    path = wer_file[0].with_suffix(".json")
    assert errors.main([str(path), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: %WER 30.43 [ 7 / 23, 2 ins, 2 del, 3 sub ] over 7 sentences")
    assert "## top 1 substitutions (ref -> hyp)" in out and "| the | a   |     2 |" in out
    assert "| two" not in out and "| extra |     1 |" in out and "| good" not in out
    assert "| 2300    | 60.00 |      3 |   1 |   0 |   2 |     5 |         2 |" in out
    assert out.endswith("| 1089    | 12.50 |      1 |   0 |   0 |   1 |     8 |         2 |\n")

    # the text file's name works too (its JSON is read)
    assert errors.main([str(wer_file[0]), "--csv", "--top", "0"]) == 0
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


def _tampered(path: Path, tmp_path: Path, change) -> Path:
    """A copy of the scores JSON beside ``path`` with ``change(doc)`` applied."""
    doc = json.loads(scores_path(path).read_text())
    change(doc)
    out = tmp_path / "tampered" / "wer_x.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc))
    return out


def test_scores_bad_input(tmp_path, wer_file, capsys):
    path = wer_file[0]
    old = tmp_path / "old" / "wer_test-other.txt"  # a text file of an older version, alone
    old.parent.mkdir()
    old.write_text(path.read_text())
    with pytest.raises(ReportError, match=r"wer_test-other.txt: no wer_test-other.json beside "
                       r"it .*python evaluate.py <hparams> --ckpt <run>/save"):
        read_scores(old)
    truncated = tmp_path / "wer_cut.json"
    truncated.write_text(scores_path(path).read_text()[:200])
    with pytest.raises(ReportError, match=r"wer_cut.json: not JSON \("):
        read_scores(truncated)
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    with pytest.raises(ReportError, match=r"other.json: version None, expected an object with "
                       "version 1"):
        read_scores(other)

    def counts(doc):  # a substitution made a deletion in the counts only
        doc["WER"]["utterances"][0].update(deletions=1, substitutions=0)

    with pytest.raises(ReportError, match=r"wer_x.json: WER: utterance 1089-134686-0000: "
                       r"deletions is 1 but the alignment has 0"):
        read_scores(_tampered(path, tmp_path, counts))

    def summary(doc):
        doc["CER"]["summary"]["WER"] = 1.0

    with pytest.raises(ReportError, match=r"CER: summary .* is not that of its utterances"):
        read_scores(_tampered(path, tmp_path, summary))

    def alignment(doc):
        doc["WER"]["utterances"][1]["alignment"][0] = ["=", 0, 5]

    with pytest.raises(ReportError, match=r"1089-134686-0001: the alignment does not cover"):
        read_scores(_tampered(path, tmp_path, alignment))

    def count_type(doc):
        doc["CER"]["utterances"][2]["num_edits"] = "4"

    with pytest.raises(ReportError, match=r"CER: utterance 121-121726-0000: num_edits is '4', "
                       "expected an integer >= 0"):
        read_scores(_tampered(path, tmp_path, count_type))

    assert errors.main([str(tmp_path / "train_log.txt")]) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'train_log.txt'}: no such file, nor train_log.json (a scores JSON "
        "written by the recipes or evaluate.py)\n"
    )
    assert errors.main([str(tmp_path / "wer_none.json")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'wer_none.json'}: cannot read")
    assert errors.main([str(old)]) == 1
    assert f"error: {old}: no wer_test-other.json beside it" in capsys.readouterr().err


# --- wer_table ------------------------------------------------------------------------------


@pytest.fixture
def results(tmp_path) -> Path:
    """results/{exp_a/7775 (two test sets, train_log), exp_b (one test set, a broken file,
    a text file without JSON)}."""
    root = tmp_path / "results"
    write_wer_file(root / "exp_a" / "7775" / "wer_test-clean.txt", UTTERANCES)
    other = {"1-1-1": ("a b c d", "a b c d"), "2-2-2": ("x y", "x")}  # 1 del in 6 words
    write_wer_file(root / "exp_a" / "7775" / "wer_test-other.txt", other)
    write_train_log(root / "exp_a" / "7775" / "train_log.txt", [80.0, 60.0, 40.0], [30.43, 16.67])
    write_wer_file(root / "exp_b" / "wer_test-clean.txt", {"3-3-3": ("a", "b")})
    (root / "exp_b" / "wer_broken.json").write_text("")  # e.g. an evaluation still running
    old = root / "exp_b" / "wer_old.txt"
    old.write_text((root / "exp_b" / "wer_test-clean.txt").read_text())
    return root


def test_wer_table_rows(results, capsys):
    df = wer_table.wer_table([results])
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in err] == [
        f"skipped {results / 'exp_b' / name}" for name in ("wer_broken.json", "wer_old.txt")
    ]
    # CER: 25 / 97 characters (spaces count, SpeechBrain's split_tokens), 2 / 10, 1 / 1
    assert df[wer_table.COLUMNS].round(2).values.tolist() == [
        ["exp_a/7775", "test-clean", 30.43, 25.77, 85.71, 2, 2, 3, 23, 7],
        ["exp_a/7775", "test-other", 16.67, 20.0, 50.0, 0, 1, 0, 6, 2],
        ["exp_b", "test-clean", 100.0, 100.0, 100.0, 0, 0, 1, 1, 1],
    ]
    assert not df["partial"].any() and df["absent"].tolist() == [0, 0, 0]
    assert df["file"].tolist()[-1] == str(results / "exp_b" / "wer_test-clean.json")

    both = wer_table.wer_table([results / "exp_a", results / "exp_b"], train_log=True)
    assert both["experiment"].tolist() == ["exp_a/7775"] * 4 + ["exp_b"]
    assert both["test_set"].tolist()[2:4] == ["train_log #1 (epoch 3)", "train_log #2 (epoch 3)"]
    assert both["WER"].tolist()[2:4] == [30.43, 16.67]  # train_log lines have only the WER
    assert both["words"].isna().tolist() == [False, False, True, True, False]
    assert wer_table.wer_table([results / "exp_b"])["experiment"].tolist() == ["exp_b"]
    # the text files' names find the same scores
    by_text = wer_table.wer_table([results], pattern="wer_*.txt")
    assert by_text[wer_table.COLUMNS].equals(df[wer_table.COLUMNS])


def test_wer_table_cli(results, capsys):
    assert wer_table.main([str(results)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "| experiment | test_set   |    WER |    CER |    SER | ins | del | sub | words | "
        "sentences |",
        "| ---------- | ---------- | -----: | -----: | -----: | --: | --: | --: | ----: | "
        "--------: |",
        "| exp_a/7775 | test-clean |  30.43 |  25.77 |  85.71 |   2 |   2 |   3 |    23 | "
        "        7 |",
        "| exp_a/7775 | test-other |  16.67 |  20.00 |  50.00 |   0 |   1 |   0 |     6 | "
        "        2 |",
        "| exp_b      | test-clean | 100.00 | 100.00 | 100.00 |   0 |   0 |   1 |     1 | "
        "        1 |",
    ]
    assert captured.err.startswith(f"warning: skipped {results / 'exp_b' / 'wer_broken.json'}: ")
    assert f"{results / 'exp_b' / 'wer_old.txt'}: no wer_old.json beside it" in captured.err

    assert wer_table.main([str(results), "--csv"]) == 0
    df = pd.read_csv(StringIO(capsys.readouterr().out))
    assert df.columns.tolist() == [*wer_table.COLUMNS, "absent", "partial", "file"]
    assert df["WER"].tolist() == [30.43, 16.67, 100.0] and df["words"].tolist() == [23, 6, 1]
    assert df["CER"].tolist() == [25.77, 20.0, 100.0]

    assert wer_table.main([str(results), "--strict"]) == 1
    assert "wer_broken.json: not JSON" in capsys.readouterr().err
    assert wer_table.main([str(results / "missing")]) == 1
    assert "missing: not a folder" in capsys.readouterr().err
    assert wer_table.main([str(results), "--pattern", "cer_*.json"]) == 1
    assert "no cer_*.json files found under" in capsys.readouterr().err


def test_wer_table_names_and_wide(results, capsys):
    """Named folders keep their order; --wide gives one row per experiment, a column per set."""
    folders = [results / "exp_b", results / "exp_a"]
    df = wer_table.wer_table(folders, names=["before", "after"])
    assert df["experiment"].tolist() == ["before", "after/7775", "after/7775"]
    wide = wer_table.wide_table(df)
    assert wide.columns.tolist() == ["experiment", "test-clean WER", "test-other WER"]
    assert wide.round(2).values.tolist()[0][:2] == ["before", 100.0]
    assert math.isnan(wide.values.tolist()[0][2])  # before has no test-other
    assert wide.round(2).values.tolist()[1] == ["after/7775", 30.43, 16.67]
    both = wer_table.wide_table(df, ["WER", "CER"]).columns.tolist()
    assert both[1:3] == ["test-clean WER", "test-clean CER"]

    capsys.readouterr()
    args = [str(f) for f in folders] + ["--names", "before", "after", "--wide"]
    assert wer_table.main(args) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| experiment | test-clean WER | test-other WER |",
        "| ---------- | -------------: | -------------: |",
        "| before     |         100.00 |                |",
        "| after/7775 |          30.43 |          16.67 |",
    ]
    nested = wer_table.wer_table([results / "exp_a", results], names=["a", "all"])
    assert nested["experiment"].tolist() == ["a/7775", "a/7775", "all/exp_b"]
    assert wer_table.main([*args[:2], "--names", "one"]) == 1
    assert "1 names for 2 folders" in capsys.readouterr().err


def test_partial_scores(tmp_path):
    """A reference without a hypothesis (SpeechBrain's scoring mode 'present'): partial."""
    refs = {"a": ["x", "y"], "b": ["z"]}
    details = wer_details_by_utterance(refs, {"a": ["x", "y"]}, True, scoring_mode="present")
    wer = ErrorRateStats()
    wer.scores = details
    path = tmp_path / "wer_p.json"
    write_scores(path, "p", {"WER": wer})
    row = wer_table.read_wer_file(path)
    assert row["partial"] and row["absent"] == 1 and row["sentences"] == 1
    assert (row["WER"], row["words"]) == (0.0, 2) and math.isnan(row["CER"])


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
