r"""Error analysis of one test set's scores (``wer_<test-set>.json``).

Reads the per-utterance WER scores the recipes and ``evaluate.py`` write
(:mod:`mamba_asr.reports.scores`: SpeechBrain ``ErrorRateStats`` details with their
alignments). Prints the most frequent substitutions (ref -> hyp), insertions and deletions,
and the WER of each speaker (SpeechBrain's ``wer_details_by_speaker``; by default the speaker
is the utterance id up to its first ``-``, the LibriSpeech ``<speaker>-<chapter>-<utterance>``
rule).

Usage:
    python -m mamba_asr.reports.errors results/conmamba/7775/wer_test-clean.json
    python -m mamba_asr.reports.errors wer_test-other.txt --top 50 --csv > errors.csv  # its JSON
    python -m mamba_asr.reports.errors wer_test-clean.json --speaker-regex '^[^-]+-[^-]+'  # chapter
    python -m mamba_asr.reports.errors wer_test.json --speaker-regex '^(\w+)_'  # group 1 if any
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from speechbrain.utils.edit_distance import EDIT_SYMBOLS, wer_details_by_speaker

from mamba_asr.reports._common import ReportError, report_error, to_markdown
from mamba_asr.reports.scores import read_scores

SPEAKER_REGEX = r"^[^-]+"


def edits(utterance: dict[str, Any]) -> Iterator[tuple[str, str | None, str | None]]:
    """``(op, ref, hyp)`` per aligned column of one utterance: op is ``=``, ``S``, ``I`` or
    ``D``; ref is None for ``I``, hyp None for ``D``."""
    ref, hyp = utterance["ref_tokens"], utterance["hyp_tokens"]
    for op, i, j in utterance["alignment"] or []:
        yield op, None if i is None else ref[i], None if j is None else hyp[j]


def top_errors(utterances: Sequence[dict[str, Any]], top: int = 20) -> dict[str, pd.DataFrame]:
    """The ``top`` most frequent edits (all when ``top`` <= 0), ties in token order.

    Returns ``{'substitutions': [ref, hyp, count], 'insertions': [hyp, count],
    'deletions': [ref, count]}`` DataFrames, most frequent first.
    """
    subs: Counter[tuple[str, str]] = Counter()
    ins: Counter[tuple[str]] = Counter()
    dels: Counter[tuple[str]] = Counter()
    for utt in utterances:
        for op, ref, hyp in edits(utt):
            if op == EDIT_SYMBOLS["sub"]:
                subs[(ref, hyp)] += 1
            elif op == EDIT_SYMBOLS["ins"]:
                ins[(hyp,)] += 1
            elif op == EDIT_SYMBOLS["del"]:
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
    utterances: Sequence[dict[str, Any]], regex: str | re.Pattern[str] = SPEAKER_REGEX
) -> pd.DataFrame:
    """WER per speaker (SpeechBrain's ``wer_details_by_speaker``), highest first (ties by
    speaker id).

    Columns: ``speaker``, ``WER`` (100 * errors / words), ``errors``, ``ins``, ``del``,
    ``sub``, ``words`` (scored reference words), ``sentences`` (scored utterances). Raises
    ReportError when ``regex`` does not match an utterance id, or a speaker has no reference
    word (an undefined WER).
    """
    regex = re.compile(regex)
    utt2spk = {utt["key"]: speaker_of(utt["key"], regex) for utt in utterances}
    try:
        details = wer_details_by_speaker(utterances, utt2spk)
    except ZeroDivisionError:
        raise ReportError(
            "a speaker has no reference word (its WER is undefined): choose another "
            "--speaker-regex"
        ) from None
    names = {"num_edits": "errors", "insertions": "ins", "dels": "del", "subs": "sub",
             "num_scored_tokens": "words", "num_scored_sents": "sentences"}
    df = pd.DataFrame([{k: d[k] for k in ["speaker", "WER", *names]} for d in details])
    df = df.rename(columns=names).reindex(columns=["speaker", "WER", *names.values()])
    return df.sort_values(["WER", "speaker"], ascending=[False, True]).reset_index(drop=True)


def report(utterances: Sequence[dict[str, Any]], top: int, regex: str) -> dict[str, pd.DataFrame]:
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
        description="Top substitutions/insertions/deletions and per-speaker WER of one test "
        "set's scores (wer_<test-set>.json)."
    )
    parser.add_argument(
        "wer_file", type=Path, help="wer_<test-set>.json (or the wer_<test-set>.txt beside it)"
    )
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
        wer = read_scores(args.wer_file)["WER"]
        tables = report(wer["utterances"], args.top, args.speaker_regex)
    except ReportError as e:
        return report_error(e)
    if args.csv:
        sys.stdout.write(to_csv(tables))
        return 0
    print(
        "{file}: %WER {WER:.2f} [ {num_edits} / {num_scored_tokens}, {insertions} ins, "
        "{deletions} del, {substitutions} sub ] over {num_scored_sents} sentences".format(
            file=args.wer_file, **wer["summary"]
        )
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
