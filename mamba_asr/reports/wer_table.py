"""WER/CER summary table of the ``wer_<test-set>.json`` scores under experiment folders.

Each file is what the recipes and ``evaluate.py`` write beside SpeechBrain's
``wer_<test-set>.txt`` (:mod:`mamba_asr.reports.scores`); a row's numbers are SpeechBrain's
``wer_summary`` of its per-utterance WER and CER scores. Folders are searched recursively; a
row's experiment is the file's folder relative to the folders given (their common parent when
several are given). A ``wer_*.txt`` without its JSON (written by an older version) is skipped
with a warning saying how to regenerate it.

Usage:
    python -m mamba_asr.reports.wer_table results/
    python -m mamba_asr.reports.wer_table results/conmamba_large results/transformer --csv
    python -m mamba_asr.reports.wer_table results/ --train-log   # + test WERs in train_log.txt
    python -m mamba_asr.reports.wer_table before/ after/ --names before after --wide
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mamba_asr.reports._common import ReportError, report_error, to_markdown
from mamba_asr.reports.curves import read_test_lines
from mamba_asr.reports.scores import SUFFIX, read_scores, scores_path

COLUMNS = ["experiment", "test_set", "WER", "CER", "SER", "ins", "del", "sub", "words",
           "sentences"]
PATTERN = f"wer_*{SUFFIX}"


def summary_row(scores: dict) -> dict[str, float | int | bool]:
    """The table's numbers of one scores JSON (:func:`read_scores`): ``WER``, ``CER`` (NaN
    without CER scores), ``SER`` (%), ``ins``, ``del``, ``sub``, ``words`` (scored reference
    words), ``sentences`` (scored), ``absent`` (no hypothesis) and ``partial`` (some
    references not scored)."""
    wer = scores["WER"]["summary"]
    cer = scores.get("CER", {}).get("summary", {})
    return {
        "WER": wer["WER"],
        "CER": cer.get("WER", float("nan")),
        "SER": wer["SER"],
        "ins": wer["insertions"],
        "del": wer["deletions"],
        "sub": wer["substitutions"],
        "words": wer["num_scored_tokens"],
        "sentences": wer["num_scored_sents"],
        "absent": wer["num_absent_sents"],
        "partial": wer["num_scored_sents"] < wer["num_ref_sents"],
    }


def read_wer_file(path: str | Path) -> dict[str, float | int | bool]:
    """:func:`summary_row` of the scores at ``path`` (a ``wer_*.json``, or the ``wer_*.txt``
    beside it); ReportError naming the file otherwise."""
    return summary_row(read_scores(path))


def _test_set(name: str, pattern: str) -> str:
    """The part of ``name`` that the ``*`` of ``pattern`` matched (``wer_test-clean.txt`` ->
    ``test-clean``); the name without its suffix for other patterns."""
    head, star, tail = pattern.partition("*")
    if star and "*" not in tail and name.startswith(head) and name.endswith(tail):
        return name[len(head) : len(name) - len(tail)]
    return Path(name).stem


def _experiment(folder: Path, base: Path) -> str:
    """``folder`` relative to ``base`` (posix); ``base``'s own name for ``base`` itself."""
    rel = folder.relative_to(base)
    return rel.as_posix() if rel.parts else base.name


def wer_table(
    folders: Sequence[str | Path],
    pattern: str = PATTERN,
    train_log: bool = False,
    strict: bool = False,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per scores JSON found recursively under ``folders``.

    Columns: ``experiment`` (folder relative to ``folders``, or to their common parent),
    ``test_set`` (the ``*`` of ``pattern``), then :func:`summary_row`'s ``WER``, ``CER``,
    ``SER``, ``ins``, ``del``, ``sub``, ``words``, ``sentences``, ``absent``, ``partial`` and
    ``file`` (the JSON); sorted by experiment and test set. ``pattern`` may name the text
    files (``wer_*.txt``): the JSON beside each is read. With ``train_log``, every ``Epoch
    loaded`` line of a ``train_log.txt`` adds a row whose test set is ``train_log #k (epoch
    N)`` and which has only the WER. Files that do not read (and ``wer_*.txt`` without their
    JSON) are skipped with a warning on stderr (raise with ``strict``); a folder that does not
    exist raises ReportError, as does finding nothing. ``names`` (one per folder) name the
    experiments instead: a file belongs to the innermost folder ``i`` given that holds it, as
    ``names[i]`` (``names[i]/<sub folder>`` below it), and the rows follow the folders' order
    (``run/before run --names before after``: the run's own files are ``after``).
    """
    roots = [Path(f).resolve() for f in folders]
    for given, root in zip(folders, roots, strict=True):
        if not root.is_dir():
            raise ReportError(f"{given}: not a folder (expected a folder of experiment results)")
    if names is not None and len(names) != len(roots):
        raise ReportError(f"{len(names)} names for {len(roots)} folders (expected one per folder)")
    base = roots[0] if len(roots) == 1 else Path(os.path.commonpath(roots))

    def experiment_of(folder: Path) -> tuple[int, str]:
        """(folder index or 0, experiment name) of a file's folder."""
        if names is None:
            return 0, _experiment(folder, base)
        holders = [i for i, root in enumerate(roots) if folder.is_relative_to(root)]
        i = max(holders, key=lambda i: len(roots[i].parts))  # the innermost folder given
        rel = folder.relative_to(roots[i])
        return i, f"{names[i]}/{rel.as_posix()}" if rel.parts else names[i]

    def found(name: str) -> list[Path]:
        return sorted({p for root in roots for p in root.rglob(name) if p.is_file()})

    def skip(error: ReportError) -> None:
        if strict:
            raise error
        print(f"warning: skipped {error}", file=sys.stderr)

    json_pattern = scores_path(pattern).name  # wer_*.txt -> wer_*.json
    candidates = found(pattern)
    if pattern == json_pattern:  # text files of older runs, without JSON: say so
        text_files = found(Path(pattern).with_suffix(".txt").name)
        candidates += [p for p in text_files if not scores_path(p).is_file()]
    rows, seen = [], set()
    for path in sorted(candidates):
        json_path = scores_path(path)
        if json_path in seen:
            continue
        seen.add(json_path)
        try:
            stats = read_wer_file(path)
        except ReportError as e:
            skip(e)
            continue
        order, experiment = experiment_of(path.parent)
        test_set = _test_set(json_path.name, json_pattern)
        rows.append({"experiment": experiment, "test_set": test_set, **stats,
                     "file": str(json_path), "order": order})
    for path in found("train_log.txt") if train_log else []:
        try:
            tests = read_test_lines(path)
        except ReportError as e:
            skip(e)
            continue
        order, experiment = experiment_of(path.parent)
        for k, test in enumerate(tests.to_dict("records"), start=1):
            rows.append(
                {
                    "experiment": experiment,
                    "order": order,
                    "test_set": f"train_log #{k} (epoch {test.get('Epoch loaded', '?')})",
                    "WER": test.get("test WER", float("nan")),
                    "file": f"{path}:{test['line']}",
                }
            )
    if not rows:
        where = ", ".join(map(str, folders))
        extra = " or train_log.txt test lines" if train_log else ""
        raise ReportError(f"no {pattern} files{extra} found under {where}")
    df = pd.DataFrame(rows).sort_values(["order", "experiment", "test_set"], kind="stable")
    df = df.reindex(columns=[*COLUMNS, "absent", "partial", "file"]).reset_index(drop=True)
    counts = ["ins", "del", "sub", "words", "sentences", "absent"]
    df[counts] = df[counts].astype("Int64")
    df["partial"] = df["partial"].astype("boolean")
    return df


def wide_table(df: pd.DataFrame, values: Sequence[str] = ("WER",)) -> pd.DataFrame:
    """:func:`wer_table`'s rows as one row per experiment (in ``df``'s order) with a
    ``<test set> <value>`` column per test set and value (test sets in order of appearance):
    e.g. a before/after comparison on the same test sets."""
    experiments = list(dict.fromkeys(df["experiment"]))
    test_sets = list(dict.fromkeys(df["test_set"]))
    table = df.pivot(index="experiment", columns="test_set", values=list(values))
    table = table.reindex(index=experiments, columns=[(v, t) for t in test_sets for v in values])
    table.columns = [f"{t} {v}" for v, t in table.columns]
    return table.astype(float).reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mamba_asr.reports.wer_table",
        description="WER/CER table of the wer_<test-set>.json scores under result folders."
    )
    parser.add_argument("folders", nargs="+", type=Path, help="result folders (searched below)")
    parser.add_argument("--csv", action="store_true", help="CSV (all columns) instead of markdown")
    parser.add_argument(
        "--pattern", default=PATTERN, help="file name glob (%(default)s; *.txt: their JSON)"
    )
    parser.add_argument(
        "--train-log", action="store_true", help="add the test WER lines of train_log.txt files"
    )
    parser.add_argument("--strict", action="store_true", help="fail on a file that does not read")
    parser.add_argument(
        "--names", nargs="+", help="experiment names, one per folder (rows in the folders' order)"
    )
    parser.add_argument(
        "--wide", action="store_true", help="one row per experiment, a WER column per test set"
    )
    args = parser.parse_args(argv)
    try:
        df = wer_table(args.folders, args.pattern, args.train_log, args.strict, args.names)
    except ReportError as e:
        return report_error(e)
    if args.csv:
        (wide_table(df) if args.wide else df).to_csv(sys.stdout, index=False, float_format="%.2f")
    else:
        print(to_markdown(wide_table(df) if args.wide else df[COLUMNS]))
        partial = df.loc[df["partial"].fillna(False).astype(bool), "file"]
        for path in partial:
            print(f"\nnote: {path} is [PARTIAL]: some references had no hypothesis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
