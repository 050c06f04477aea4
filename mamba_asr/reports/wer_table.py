"""WER summary table of the ``wer_<test-set>.txt`` files under experiment folders.

Each file is the output of SpeechBrain's ``ErrorRateStats.write_stats``; its first lines are
``%WER 3.42 [ 1798 / 52576, 211 ins, 144 del, 1443 sub ]`` (`` [PARTIAL]`` appended when some
references had no hypothesis), ``%SER 35.11 [ 920 / 2620 ]`` and
``Scored 2620 sentences, 0 not present in hyp.``. Folders are searched recursively; a row's
experiment is the file's folder relative to the folders given (their common parent when
several are given).

Usage:
    python -m mamba_asr.reports.wer_table results/
    python -m mamba_asr.reports.wer_table results/conmamba_large results/transformer --csv
    python -m mamba_asr.reports.wer_table results/ --train-log   # + test WERs in train_log.txt
    python -m mamba_asr.reports.wer_table results/ --pattern 'cer_*.txt'
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mamba_asr.reports._common import ReportError, read_text, report_error, to_markdown
from mamba_asr.reports.curves import read_test_lines

_WER = re.compile(
    r"%WER (?P<WER>\S+) \[ (?P<errors>\d+) / (?P<words>\d+), (?P<ins>\d+) ins, "
    r"(?P<del>\d+) del, (?P<sub>\d+) sub \](?P<partial> \[PARTIAL\])?"
)
_SER = re.compile(r"%SER (?P<SER>\S+) \[ (?P<err_sentences>\d+) / (?P<sentences>\d+) \]")
_SCORED = re.compile(r"Scored (?P<scored>\d+) sentences, (?P<absent>\d+) not present in hyp\.")
_HEADER = (_WER, _SER, _SCORED)
_HEADER_FORMAT = (
    "a SpeechBrain ErrorRateStats.write_stats file starting with "
    "'%WER 3.42 [ 1798 / 52576, 211 ins, 144 del, 1443 sub ]', '%SER ...' and 'Scored ...'"
)
COLUMNS = ["experiment", "test_set", "WER", "SER", "ins", "del", "sub", "words", "sentences"]
_COUNTS = ["ins", "del", "sub", "words", "err_sentences", "sentences", "absent"]


def parse_wer_header(text: str, path: str | Path = "<text>") -> dict[str, float | int | bool]:
    """Totals from the first three lines of a ``write_stats`` file.

    Returns ``WER``, ``SER`` (float, %), ``ins``, ``del``, ``sub``, ``words``
    (reference tokens), ``err_sentences``, ``sentences`` (scored), ``absent`` (int) and
    ``partial`` (bool). Raises ReportError naming ``path`` when the header does not match.
    """
    lines = [*text.splitlines()[:3], "", "", ""][:3]
    matches = [rx.fullmatch(line.strip()) for rx, line in zip(_HEADER, lines, strict=True)]
    if not all(matches):
        bad = next(i for i, m in enumerate(matches) if m is None)
        raise ReportError(
            f"{path}: line {bad + 1} is not a WER summary line (expected {_HEADER_FORMAT})"
        )
    fields = {k: v for m in matches for k, v in m.groupdict().items()}
    try:
        out: dict[str, float | int | bool] = {k: float(fields[k]) for k in ("WER", "SER")}
    except ValueError as e:
        raise ReportError(f"{path}: {e} in its %WER/%SER line") from e
    out.update({k: int(fields[k]) for k in _COUNTS})
    out["partial"] = fields["partial"] is not None
    return out


def read_wer_file(path: str | Path) -> dict[str, float | int | bool]:
    """``parse_wer_header`` of the file at ``path``."""
    return parse_wer_header(read_text(path, _HEADER_FORMAT), path)


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
    pattern: str = "wer_*.txt",
    train_log: bool = False,
    strict: bool = False,
) -> pd.DataFrame:
    """One row per WER file found recursively under ``folders``.

    Columns: ``experiment`` (folder relative to ``folders``, or to their common parent),
    ``test_set`` (the ``*`` of ``pattern``), ``WER``, ``SER`` (%), ``ins``, ``del``, ``sub``,
    ``words``, ``sentences``, ``absent``, ``partial``, ``file``; sorted by experiment and
    test set. With ``train_log``, every ``Epoch loaded`` line of a ``train_log.txt`` adds a
    row whose test set is ``train_log #k (epoch N)`` and which has only the WER. Files that
    are not WER files are skipped with a warning on stderr (raise with ``strict``); a folder
    that does not exist raises ReportError, as does finding nothing.
    """
    roots = [Path(f).resolve() for f in folders]
    for given, root in zip(folders, roots, strict=True):
        if not root.is_dir():
            raise ReportError(f"{given}: not a folder (expected a folder of experiment results)")
    base = roots[0] if len(roots) == 1 else Path(os.path.commonpath(roots))

    def found(name: str) -> list[Path]:
        return sorted({p for root in roots for p in root.rglob(name) if p.is_file()})

    def skip(error: ReportError) -> None:
        if strict:
            raise error
        print(f"warning: skipped {error}", file=sys.stderr)

    rows = []
    for path in found(pattern):
        try:
            stats = read_wer_file(path)
        except ReportError as e:
            skip(e)
            continue
        experiment, test_set = _experiment(path.parent, base), _test_set(path.name, pattern)
        rows.append({"experiment": experiment, "test_set": test_set, **stats, "file": str(path)})
    for path in found("train_log.txt") if train_log else []:
        try:
            tests = read_test_lines(path)
        except ReportError as e:
            skip(e)
            continue
        for k, test in enumerate(tests.to_dict("records"), start=1):
            rows.append(
                {
                    "experiment": _experiment(path.parent, base),
                    "test_set": f"train_log #{k} (epoch {test.get('Epoch loaded', '?')})",
                    "WER": test.get("test WER", float("nan")),
                    "file": f"{path}:{test['line']}",
                }
            )
    if not rows:
        where = ", ".join(map(str, folders))
        extra = " or train_log.txt test lines" if train_log else ""
        raise ReportError(f"no {pattern} files{extra} found under {where}")
    df = pd.DataFrame(rows).reindex(columns=[*COLUMNS, "absent", "partial", "file"])
    counts = ["ins", "del", "sub", "words", "sentences", "absent"]
    df[counts] = df[counts].astype("Int64")
    df["partial"] = df["partial"].astype("boolean")
    return df.sort_values(["experiment", "test_set"], kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mamba_asr.reports.wer_table",
        description="Table of the WER files (SpeechBrain ErrorRateStats) under result folders."
    )
    parser.add_argument("folders", nargs="+", type=Path, help="result folders (searched below)")
    parser.add_argument("--csv", action="store_true", help="CSV (all columns) instead of markdown")
    parser.add_argument("--pattern", default="wer_*.txt", help="file name glob (%(default)s)")
    parser.add_argument(
        "--train-log", action="store_true", help="add the test WER lines of train_log.txt files"
    )
    parser.add_argument("--strict", action="store_true", help="fail on a file that does not parse")
    args = parser.parse_args(argv)
    try:
        df = wer_table(args.folders, args.pattern, args.train_log, args.strict)
    except ReportError as e:
        return report_error(e)
    if args.csv:
        df.to_csv(sys.stdout, index=False, float_format="%.2f")
    else:
        print(to_markdown(df[COLUMNS]))
        partial = df.loc[df["partial"].fillna(False).astype(bool), "file"]
        for path in partial:
            print(f"\nnote: {path} is [PARTIAL]: some references had no hypothesis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
