r"""Error analysis of one ``wer_<test-set>.txt`` (SpeechBrain ``ErrorRateStats.write_stats``).

Reads the per-utterance alignments that ``speechbrain.dataio.wer.print_alignments`` writes
after the summary: for each utterance a line of 80 ``=``, then
``<utt-id>, %WER 12.50 [ 1 / 8, 0 ins, 0 del, 1 sub ]`` and three aligned lines (reference,
operations ``=``/``S``/``I``/``D``, hypothesis; columns joined by `` ; ``, ``<eps>`` opposite
an insertion or deletion). Prints the most frequent substitutions (ref -> hyp), insertions and
deletions, and the WER of each speaker (by default the utterance id up to its first ``-``, the
LibriSpeech ``<speaker>-<chapter>-<utterance>`` rule).

Usage:
    python -m mamba_asr.reports.errors results/conmamba/7775/wer_test-clean.txt
    python -m mamba_asr.reports.errors wer_test-other.txt --top 50 --csv > errors.csv
    python -m mamba_asr.reports.errors wer_test-clean.txt --speaker-regex '^[^-]+-[^-]+'  # chapter
    python -m mamba_asr.reports.errors wer_test.txt --speaker-regex '^(\w+)_'  # group 1 if any
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mamba_asr.reports._common import ReportError, read_text, report_error, to_markdown
from mamba_asr.reports.wer_table import parse_wer_header

SEPARATOR = "=" * 80
SPEAKER_REGEX = r"^[^-]+"
_UTT_HEADER = re.compile(
    r"(?P<key>.*), %WER (?P<WER>\S+) \[ (?P<errors>\d+) / (?P<words>\d+), (?P<ins>\d+) ins, "
    r"(?P<dels>\d+) del, (?P<subs>\d+) sub \]"
)
_FORMAT = "a SpeechBrain ErrorRateStats.write_stats file with its ALIGNMENTS section"
_OPS = {"=", "S", "I", "D"}


@dataclass
class Utterance:
    """One scored utterance of a WER file.

    ``ops`` holds ``(op, ref, hyp)`` per aligned column: op is ``=``, ``S``, ``I`` or ``D``;
    ref is None for ``I``, hyp None for ``D``. ``words`` counts reference tokens.
    """

    key: str
    wer: float
    words: int
    ins: int
    dels: int
    subs: int
    ops: list[tuple[str, str | None, str | None]]

    @property
    def errors(self) -> int:
        return self.ins + self.dels + self.subs


def _split_columns(ref: str, ops: str, hyp: str) -> list[tuple[str, str | None, str | None]]:
    """Cut the three aligned lines at the widths of the operation line's columns.

    Every column is centred in the same width on all three lines, and an operation is one
    character, so the widths are exact even for tokens that contain ``' ; '`` or spaces.
    """
    out: list[tuple[str, str | None, str | None]] = []
    if not ops.strip():
        return out
    cells = ops.split(" ; ")
    start = 0
    for i, cell in enumerate(cells):
        end = None if i == len(cells) - 1 else start + len(cell)
        op = cell.strip()
        if op not in _OPS:
            raise ValueError(f"unknown edit operation {op!r}")
        r, h = ref[start:end].strip(), hyp[start:end].strip()
        out.append((op, None if op == "I" else r, None if op == "D" else h))
        start = start + len(cell) + 3
    return out


def parse_alignments(text: str, path: str | Path = "<text>") -> list[Utterance]:
    """The utterances of a ``write_stats`` text, in file order.

    Skips the summary and the ``Format:`` example block; checks each utterance's counts
    against its operations and the totals against the ``%WER`` header. Raises ReportError
    naming ``path`` and the line when the text is not in that format.
    """
    header = parse_wer_header(text, path)
    lines = text.splitlines()
    try:
        i = lines.index("ALIGNMENTS")
    except ValueError:
        raise ReportError(f"{path}: no ALIGNMENTS section (expected {_FORMAT})") from None
    i += 1
    while i < len(lines) and lines[i] != SEPARATOR:  # the Format: example block
        i += 1
    while lines and not lines[-1].strip():  # an empty last alignment reads as blank lines
        lines.pop()
    utterances = []
    while i < len(lines):
        lineno = i + 2  # 1-based number of the utterance header line
        m = _UTT_HEADER.fullmatch(lines[i + 1]) if i + 1 < len(lines) else None
        if lines[i] != SEPARATOR or m is None:
            raise ReportError(
                f"{path}:{i + 1}: expected a line of 80 '=' then "
                f"'<utt-id>, %WER x [ e / n, i ins, d del, s sub ]' (expected {_FORMAT})"
            )
        ref, ops, hyp = (lines[j] if j < len(lines) else "" for j in range(i + 2, i + 5))
        try:
            aligned = _split_columns(ref, ops, hyp)
        except ValueError as e:
            raise ReportError(f"{path}:{lineno + 2}: {e} (expected '=', 'S', 'I' or 'D')") from e
        utt = Utterance(
            key=m["key"],
            wer=float(m["WER"]),
            words=int(m["words"]),
            ins=int(m["ins"]),
            dels=int(m["dels"]),
            subs=int(m["subs"]),
            ops=aligned,
        )
        n = Counter(op for op, _, _ in aligned)
        found = (n["I"], n["D"], n["S"], len(aligned) - n["I"])
        if found != (utt.ins, utt.dels, utt.subs, utt.words):
            raise ReportError(
                f"{path}:{lineno}: {utt.key} has {utt.ins} ins, {utt.dels} del, {utt.subs} sub, "
                f"{utt.words} words in its header but {found[0]} ins, {found[1]} del, "
                f"{found[2]} sub, {found[3]} words in its alignment"
            )
        utterances.append(utt)
        i += 5
    totals = {
        "ins": sum(u.ins for u in utterances),
        "del": sum(u.dels for u in utterances),
        "sub": sum(u.subs for u in utterances),
        "words": sum(u.words for u in utterances),
        "sentences": len(utterances),
    }
    expected = {k: header[k] for k in totals}
    if totals != expected:
        raise ReportError(
            f"{path}: the alignments add up to {totals}, the %WER header says {expected}"
        )
    return utterances


def read_alignments(path: str | Path) -> list[Utterance]:
    """``parse_alignments`` of the file at ``path``."""
    return parse_alignments(read_text(path, _FORMAT), path)


def top_errors(utterances: Sequence[Utterance], top: int = 20) -> dict[str, pd.DataFrame]:
    """The ``top`` most frequent edits (all when ``top`` <= 0), ties in token order.

    Returns ``{'substitutions': [ref, hyp, count], 'insertions': [hyp, count],
    'deletions': [ref, count]}`` DataFrames, most frequent first.
    """
    subs: Counter[tuple[str, str]] = Counter()
    ins: Counter[tuple[str]] = Counter()
    dels: Counter[tuple[str]] = Counter()
    for utt in utterances:
        for op, ref, hyp in utt.ops:
            if op == "S":
                subs[(ref, hyp)] += 1
            elif op == "I":
                ins[(hyp,)] += 1
            elif op == "D":
                dels[(ref,)] += 1

    def table(counts: Counter, columns: list[str]) -> pd.DataFrame:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ranked = ranked[:top] if top > 0 else ranked
        return pd.DataFrame([[*k, n] for k, n in ranked], columns=[*columns, "count"])

    return {
        "substitutions": table(subs, ["ref", "hyp"]),
        "insertions": table(ins, ["hyp"]),
        "deletions": table(dels, ["ref"]),
    }


def speaker_of(key: str, regex: str | re.Pattern[str] = SPEAKER_REGEX) -> str:
    """Speaker id of an utterance id: group 1 of ``regex`` if it has one, else the match.

    ``speaker_of('1089-134686-0000')`` -> ``'1089'``. Raises ReportError when ``regex``
    does not match ``key``.
    """
    m = re.search(regex, key)
    if m is None:
        pattern = regex.pattern if isinstance(regex, re.Pattern) else regex
        raise ReportError(f"speaker regex {pattern!r} does not match utterance id {key!r}")
    return m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)


def speaker_wer(
    utterances: Sequence[Utterance], regex: str | re.Pattern[str] = SPEAKER_REGEX
) -> pd.DataFrame:
    """WER per speaker, highest first (ties by speaker id).

    Columns: ``speaker``, ``WER`` (100 * errors / max(1, words), SpeechBrain's
    per-utterance rule), ``errors``, ``ins``, ``del``, ``sub``, ``words``, ``sentences``.
    """
    regex = re.compile(regex)
    rows: dict[str, dict[str, int]] = {}
    for utt in utterances:
        row = rows.setdefault(
            speaker_of(utt.key, regex),
            {"errors": 0, "ins": 0, "del": 0, "sub": 0, "words": 0, "sentences": 0},
        )
        for name, value in [
            ("errors", utt.errors),
            ("ins", utt.ins),
            ("del", utt.dels),
            ("sub", utt.subs),
            ("words", utt.words),
            ("sentences", 1),
        ]:
            row[name] += value
    df = pd.DataFrame(
        [
            {"speaker": spk, "WER": 100.0 * r["errors"] / max(1, r["words"]), **r}
            for spk, r in rows.items()
        ],
        columns=["speaker", "WER", "errors", "ins", "del", "sub", "words", "sentences"],
    )
    return df.sort_values(["WER", "speaker"], ascending=[False, True]).reset_index(drop=True)


def report(utterances: Sequence[Utterance], top: int, regex: str) -> dict[str, pd.DataFrame]:
    """``top_errors`` plus ``{'speakers': speaker_wer(...)}``."""
    return {**top_errors(utterances, top), "speakers": speaker_wer(utterances, regex)}


def to_csv(tables: dict[str, pd.DataFrame]) -> str:
    """One long CSV of all sections: ``section, ref, hyp, speaker, count, WER, ins, del, sub,
    words, sentences`` (``count`` is the edit count; for a speaker, its errors)."""
    columns = ["section", "ref", "hyp", "speaker", "count", "WER"]
    columns += ["ins", "del", "sub", "words", "sentences"]
    parts = []
    for section, df in tables.items():
        part = df.rename(columns={"errors": "count"}).assign(section=section.rstrip("s"))
        parts.append(part.reindex(columns=columns))
    merged = pd.concat([p for p in parts if not p.empty] or parts, ignore_index=True)
    counts = ["count", "ins", "del", "sub", "words", "sentences"]
    merged[counts] = merged[counts].astype("Int64")
    return merged.to_csv(index=False, float_format="%.2f", lineterminator="\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mamba_asr.reports.errors",
        description="Top substitutions/insertions/deletions and per-speaker WER of one "
        "SpeechBrain WER file (ErrorRateStats.write_stats)."
    )
    parser.add_argument("wer_file", type=Path, help="wer_<test-set>.txt")
    parser.add_argument("--top", type=int, default=20, help="edits listed per kind (0: all)")
    parser.add_argument(
        "--speaker-regex",
        default=SPEAKER_REGEX,
        help="speaker = group 1 (or the whole match) of this regex on the utterance id "
        "(default: %(default)s, the LibriSpeech rule)",
    )
    parser.add_argument("--csv", action="store_true", help="one long CSV instead of text")
    args = parser.parse_args(argv)
    try:
        re.compile(args.speaker_regex)
    except re.error as e:
        parser.error(f"--speaker-regex: {e}")
    try:
        utterances = read_alignments(args.wer_file)
        tables = report(utterances, args.top, args.speaker_regex)
    except ReportError as e:
        return report_error(e)
    if args.csv:
        sys.stdout.write(to_csv(tables))
        return 0
    total = tables["speakers"][["errors", "ins", "del", "sub", "words"]].sum()
    print(
        f"{args.wer_file}: %WER {100.0 * total['errors'] / max(1, total['words']):.2f} "
        f"[ {total['errors']} / {total['words']}, {total['ins']} ins, {total['del']} del, "
        f"{total['sub']} sub ] over {len(utterances)} sentences"
    )
    titles = {
        "substitutions": "substitutions (ref -> hyp)",
        "insertions": "insertions",
        "deletions": "deletions",
        "speakers": f"per-speaker WER (speaker regex {args.speaker_regex!r})",
    }
    for section, df in tables.items():
        shown = "" if section == "speakers" or args.top <= 0 else f"top {args.top} "
        print(f"\n## {shown}{titles[section]}\n")
        print(to_markdown(df) if not df.empty else "(none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
