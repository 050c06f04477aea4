"""Per-utterance error-rate scores of one test set as JSON (``wer_<test-set>.json``).

The recipes write it beside SpeechBrain's pretty-printed ``wer_<test-set>.txt``; the report
tools read it. One object::

    {"version": 1, "test_set": "test-clean",
     "WER": {"summary": {...}, "utterances": [{...}, ...]},
     "CER": {"summary": {...}, "utterances": [{...}, ...]}}

``utterances`` are the entries of ``ErrorRateStats.scores`` (SpeechBrain's
``wer_details_by_utterance``: ``key``, ``scored``, ``hyp_absent``, ``hyp_empty``,
``num_edits``, ``num_ref_tokens``, ``WER``, ``insertions``, ``deletions``,
``substitutions``; for WER also ``ref_tokens``, ``hyp_tokens`` and ``alignment``, a list of
``[op, ref index, hyp index]``); CER utterances keep only the counts (their characters are
the words' letters). ``summary`` is ``speechbrain.utils.edit_distance.wer_summary`` of them,
so the SpeechBrain helpers (``wer_summary``, ``wer_details_by_speaker``, ``top_wer_utts``)
run on the utterances as they are.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from speechbrain.utils.edit_distance import EDIT_SYMBOLS, wer_summary
from speechbrain.utils.metric_stats import ErrorRateStats

from mamba_asr.atomic import atomic_open
from mamba_asr.reports._common import ReportError, read_text

VERSION = 1
SUFFIX = ".json"
# Keys of an utterance that only the alignment needs (dropped from CER utterances).
ALIGNMENT_KEYS = ("alignment", "ref_tokens", "hyp_tokens")
_COUNT_KEYS = ("num_edits", "num_ref_tokens", "insertions", "deletions", "substitutions")
_OPS = {EDIT_SYMBOLS["ins"]: "insertions", EDIT_SYMBOLS["del"]: "deletions",
        EDIT_SYMBOLS["sub"]: "substitutions"}
REGENERATE = (
    "regenerate it with `python evaluate.py <hparams> --ckpt <run>/save --test_csv <manifest>`"
)


def scores_path(path: str | os.PathLike) -> Path:
    """The JSON of a results file: ``path`` itself for ``.json``, else the ``.json`` beside it
    (``wer_test-clean.txt`` -> ``wer_test-clean.json``)."""
    path = Path(path)
    return path if path.suffix == SUFFIX else path.with_suffix(SUFFIX)


def write_scores(
    path: str | os.PathLike, test_set: str, metrics: dict[str, ErrorRateStats]
) -> None:
    """Writes (atomically) the scores of ``metrics`` (``{"WER": ..., "CER": ...}``) to
    ``path``; the alignment and tokens are kept for WER only."""
    doc: dict[str, Any] = {"version": VERSION, "test_set": test_set}
    for name, metric in metrics.items():
        utterances = metric.scores
        if name != "WER":
            utterances = [{k: v for k, v in u.items() if k not in ALIGNMENT_KEYS}
                          for u in utterances]
        doc[name] = {"summary": wer_summary(utterances), "utterances": utterances}
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
        f.write("\n")


def read_scores(path: str | os.PathLike) -> dict[str, Any]:
    """The checked content of a scores JSON (``path``, or the JSON beside a ``wer_*.txt``).

    Raises ReportError naming the file when it is missing (a ``wer_*.txt`` written before the
    JSON existed included), not JSON, or not in the format above: a key or value of the
    wrong type, an alignment that does not match its counts, a summary that is not
    ``wer_summary`` of the utterances.
    """
    path = Path(path)
    json_path = scores_path(path)
    expected = "a scores JSON written by the recipes or evaluate.py"
    if json_path != path and not json_path.is_file():
        if not path.is_file():
            raise ReportError(f"{path}: no such file, nor {json_path.name} ({expected})")
        raise ReportError(
            f"{path}: no {json_path.name} beside it (written before the recipes wrote JSON "
            f"scores, or by another tool); the reports read the JSON: {REGENERATE}"
        )
    try:
        doc = json.loads(read_text(json_path, expected))
    except json.JSONDecodeError as e:
        raise ReportError(f"{json_path}: not JSON ({e}); expected {expected}") from e
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        found = doc.get("version") if isinstance(doc, dict) else type(doc).__name__
        raise ReportError(
            f"{json_path}: version {found!r}, expected an object with version {VERSION} "
            f"({expected}); {REGENERATE}"
        )
    if not isinstance(doc.get("test_set"), str) or "WER" not in doc:
        raise ReportError(f"{json_path}: expected the keys test_set (a string) and WER")
    for metric in ("WER", "CER"):
        if metric in doc:
            try:
                _check_metric(doc[metric], metric == "WER")
            except ValueError as e:
                raise ReportError(f"{json_path}: {metric}: {e}") from None
    return doc


def _check_metric(scores: Any, aligned: bool) -> None:
    """ValueError saying what is wrong with one metric's ``{"summary", "utterances"}``."""
    if not isinstance(scores, dict) or not isinstance(scores.get("utterances"), list):
        raise ValueError("expected an object with an utterances list")
    utterances = scores["utterances"]
    for n, utt in enumerate(utterances):
        key = utt.get("key") if isinstance(utt, dict) else None
        if not isinstance(key, str):
            raise ValueError(f"utterance #{n}: expected an object with a string key")
        try:
            _check_utterance(utt, aligned)
        except ValueError as e:
            raise ValueError(f"utterance {key}: {e}") from None
    if not any(u["scored"] for u in utterances):
        raise ValueError("no scored utterance")
    summary = wer_summary(utterances)
    stored = scores.get("summary")
    if not isinstance(stored, dict) or any(
        not isinstance(stored.get(k), (int, float))
        or not math.isclose(stored[k], v, rel_tol=1e-9, abs_tol=1e-9)
        for k, v in summary.items()
    ):
        raise ValueError(f"summary {stored} is not that of its utterances ({summary})")


def _check_utterance(utt: dict[str, Any], aligned: bool) -> None:
    """ValueError naming the first key of a per-utterance entry with a wrong value."""
    if not isinstance(utt.get("scored"), bool) or not isinstance(utt.get("hyp_absent"), bool):
        raise ValueError("expected booleans scored and hyp_absent")
    if not utt["scored"]:
        return
    for k in _COUNT_KEYS:
        if type(utt.get(k)) is not int or utt[k] < 0:
            raise ValueError(f"{k} is {utt.get(k)!r}, expected an integer >= 0")
    if utt["num_edits"] != utt["insertions"] + utt["deletions"] + utt["substitutions"]:
        raise ValueError("num_edits is not insertions + deletions + substitutions")
    if not aligned:
        return
    alignment, ref, hyp = (utt.get(k) for k in ALIGNMENT_KEYS)
    if not all(isinstance(t, list) and all(isinstance(x, str) for x in t) for t in (ref, hyp)):
        raise ValueError("expected lists of strings ref_tokens and hyp_tokens")
    if not isinstance(alignment, list):
        raise ValueError(f"alignment is {alignment!r}, expected a list of [op, i, j]")
    ops: Counter[str] = Counter()
    refs, hyps = [], []
    for step in alignment:
        op, i, j = step if isinstance(step, list) and len(step) == 3 else (None, None, None)
        if op not in EDIT_SYMBOLS.values() or (i is None) != (op == EDIT_SYMBOLS["ins"]) or (
            j is None
        ) != (op == EDIT_SYMBOLS["del"]):
            raise ValueError(f"alignment step {step!r} is not [op, i, j] (op one of =SID)")
        ops[op] += 1
        refs += [] if i is None else [i]
        hyps += [] if j is None else [j]
    if refs != list(range(len(ref))) or hyps != list(range(len(hyp))):
        raise ValueError("the alignment does not cover ref_tokens and hyp_tokens in order")
    for op, k in _OPS.items():
        if ops[op] != utt[k]:
            raise ValueError(f"{k} is {utt[k]} but the alignment has {ops[op]}")
