"""LibriSpeech CSV manifests (ID,duration,wav,spk_id,wrd) for the SpeechBrain recipes.

``librispeech_prepare.py`` at the top of the repository is the command-line entry and keeps
SpeechBrain's import path (``from librispeech_prepare import prepare_librispeech``); the code
lives here so that the shared package never imports upwards.

The Python API matches SpeechBrain's recipe function. Beyond it: durations come from the
audio headers (no decoding), files are read by ``num_workers`` processes, every CSV is
written atomically, and the options each CSV was made with are recorded in
``librispeech_prepare.json`` beside it, so a second run with the same options opens no
audio file and rewrites nothing, while changed options re-prepare what they affect.

Problems in the data are handled as follows (all errors name the file and what was expected,
are collected for the whole split and raised together before its CSV is written):

=====================================================  ==========================================
case                                                   handling
=====================================================  ==========================================
data folder missing / holds no LibriSpeech splits      error
requested split folder missing                         error (lists the splits that exist)
split without any utterance                            error
chapter folder with audio but no ``*.trans.txt``       error (an incomplete copy of the corpus)
transcript line whose audio file is missing            error
audio file without a transcript line                   warning: skipped, counted in the summary
transcript not UTF-8, malformed line, duplicate ID     error (file and line number)
words with characters other than A-Z, ', space         error (the character recipes expect them)
empty, unreadable, truncated or non-audio file         error
sample rate other than 16 kHz or more than one channel error
=====================================================  ==========================================
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mamba_asr.atomic import atomic_open, remove_stale_temporaries
from mamba_asr.audio_info import (
    AudioHeaderError,
    AudioInfo,
    count_decoded_frames,
    read_audio_info,
)
from mamba_asr.workers import exit_with_parent

logger = logging.getLogger(__name__)

SAMPLERATE = 16000
CSV_HEADER = ["ID", "duration", "wav", "spk_id", "wrd"]
RECORD_FILE = "librispeech_prepare.json"
RECORD_VERSION = 1
DATA_ROOT_PLACEHOLDER = "$data_root"
LEXICON_FILE = "librispeech-lexicon.txt"
LEXICON_URL = "http://www.openslr.org/resources/11/librispeech-lexicon.txt"
AUDIO_EXT = ".flac"
TRANS_SUFFIX = ".trans.txt"
MAX_LISTED_PROBLEMS = 20
_UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_VALID_TEXT = re.compile(r"^[A-Z' ]+$")


class LibriSpeechPrepError(ValueError):
    """The data folder does not hold what LibriSpeech preparation expects."""


@dataclass
class SplitScan:
    """What one split folder holds: transcripts by utterance ID and audio paths."""

    split: str
    texts: dict[str, str] = field(default_factory=dict)
    audio: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    untranscribed: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- locating data


def librispeech_root(data_folder: str | os.PathLike) -> Path:
    """The LibriSpeech folder given ``data_folder`` (the folder itself or its parent).

    Recipes pass this folder as ``$data_root`` when CSVs were written with placeholders.
    """
    folder = Path(os.path.abspath(os.fspath(data_folder)))
    if not folder.is_dir():
        raise LibriSpeechPrepError(f"data folder {folder} does not exist (or is not a folder)")
    nested = folder / "LibriSpeech"
    return nested if nested.is_dir() else folder


def _check_splits(root: Path, splits: Sequence[str]) -> None:
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    for split in splits:
        if not (root / split).is_dir():
            hint = (
                f"splits found there: {', '.join(present)}"
                if present
                else "the folder holds no split folders; data_folder must be the LibriSpeech "
                "folder or the folder that contains LibriSpeech/"
            )
            raise LibriSpeechPrepError(
                f"split folder {root / split} does not exist (expected LibriSpeech layout "
                f"<data_folder>/LibriSpeech/{split}/<speaker>/<chapter>/; {hint})"
            )


# --------------------------------------------------------------------------- transcripts


def _parse_transcript(path: str, scan: SplitScan) -> None:
    """Add the lines of one ``<spk>-<chapter>.trans.txt`` to ``scan.texts``."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        scan.errors.append(
            f"{path}:{line_no}: transcript is not valid UTF-8 (byte 0x{raw[exc.start]:02x})"
        )
        return
    chapter_key = os.path.basename(path)[: -len(TRANS_SUFFIX)]
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        utt_id, _, text = line.strip().partition(" ")
        words = text.split()
        where = f"{path}:{line_no}"
        if not _UTT_ID.match(utt_id) or not utt_id.startswith(chapter_key + "-"):
            scan.errors.append(
                f"{where}: malformed line {line[:60]!r}: expected "
                f"'{chapter_key}-<utterance> WORDS' as in LibriSpeech"
            )
        elif not words:
            scan.errors.append(f"{where}: utterance {utt_id} has no words")
        elif utt_id in scan.texts:
            scan.errors.append(f"{where}: duplicate utterance ID {utt_id}")
        else:
            sentence = " ".join(words)
            if not _VALID_TEXT.match(sentence):
                bad = sorted(set(re.sub(r"[A-Z' ]", "", sentence)))
                scan.errors.append(
                    f"{where}: utterance {utt_id} has characters {''.join(bad)!r}; "
                    "LibriSpeech transcripts use only A-Z, apostrophe and space"
                )
            else:
                scan.texts[utt_id] = sentence


def _scan_split(root: Path, split: str) -> SplitScan:
    """Walk one split folder: parse its transcripts and list its audio files."""
    scan = SplitScan(split)
    stack = [str(root / split)]
    while stack:
        folder = stack.pop()
        audio, trans = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.name.endswith(AUDIO_EXT):
                    audio.append(entry)
                elif entry.name.endswith(TRANS_SUFFIX):
                    trans.append(entry.path)
        if audio and not trans:
            scan.errors.append(
                f"{folder}: chapter folder holds {len(audio)} audio files but no "
                f"<speaker>-<chapter>{TRANS_SUFFIX} transcript"
            )
            continue
        for path in sorted(trans):
            _parse_transcript(path, scan)
        for entry in audio:
            scan.audio[entry.name[: -len(AUDIO_EXT)]] = entry.path
    for utt_id in scan.texts:
        if utt_id not in scan.audio:
            scan.errors.append(
                f"transcript line {utt_id} has no audio file (expected "
                f"{_expected_audio_path(root, split, utt_id)})"
            )
    scan.untranscribed = sorted(p for u, p in scan.audio.items() if u not in scan.texts)
    return scan


def _expected_audio_path(root: Path, split: str, utt_id: str) -> Path:
    spk, chapter, _ = utt_id.split("-")
    return root / split / spk / chapter / f"{utt_id}{AUDIO_EXT}"


def _sort_key(utt_id: str) -> tuple[int, ...]:
    return tuple(int(x) for x in utt_id.split("-"))


# --------------------------------------------------------------------------- audio headers


def _header_chunk(paths: list[str], check_audio: bool) -> list[tuple[int, int, int] | str]:
    """Worker: (sample_rate, channels, frames) for each path, or an error message."""
    out: list[tuple[int, int, int] | str] = []
    for path in paths:
        try:
            info = read_audio_info(path)
            if check_audio:
                info = _decode_check(path, info)
            out.append((info.sample_rate, info.channels, info.num_frames))
        except (AudioHeaderError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            out.append(f"{path}: unreadable or corrupt audio: {reason}")
    return out


def _decode_check(path: str, info: AudioInfo) -> AudioInfo:
    """Decode the whole file (``check_audio``) so damage past the header is found too."""
    frames = count_decoded_frames(path)
    if frames != info.num_frames:
        raise AudioHeaderError(f"header says {info.num_frames} samples, decoded {frames}")
    return info


def read_headers(
    paths: list[str], num_workers: int, check_audio: bool = False
) -> list[tuple[int, int, int] | str]:
    """Header facts of ``paths`` in order, read by ``num_workers`` processes."""
    if num_workers <= 1 or len(paths) < 256:
        return _header_chunk(paths, check_audio)
    n_chunks = max(num_workers * 4, len(paths) // 8192)
    size = -(-len(paths) // n_chunks)
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    results: list[tuple[int, int, int] | str] = []
    pool = ProcessPoolExecutor(num_workers, initializer=exit_with_parent, initargs=(os.getpid(),))
    with pool:
        for part in pool.map(_header_chunk, chunks, [check_audio] * len(chunks)):
            results.extend(part)
    return results


# --------------------------------------------------------------------------- records


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_record(save_folder: Path) -> dict:
    path = save_folder / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"version": RECORD_VERSION, "files": {}}
    if record.get("version") != RECORD_VERSION or not isinstance(record.get("files"), dict):
        return {"version": RECORD_VERSION, "files": {}}
    return record


def _is_current(save_folder: Path, record: dict, name: str, options: dict) -> bool:
    """True when ``name`` exists, was made with ``options`` and is unchanged since."""
    entry = record["files"].get(name)
    path = save_folder / name
    if entry is None or entry.get("options") != options or not path.is_file():
        return False
    return path.stat().st_size == entry.get("size") and _file_sha256(path) == entry.get("sha256")


def _remember(save_folder: Path, record: dict, name: str, options: dict, **facts) -> None:
    path = save_folder / name
    record["files"][name] = {
        "options": options,
        "size": path.stat().st_size,
        "sha256": _file_sha256(path),
        **facts,
    }
    with atomic_open(save_folder / RECORD_FILE, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)


# --------------------------------------------------------------------------- CSV writing


def _split_rows(
    root: Path,
    split: str,
    n_sentences: int | None,
    num_workers: int,
    data_root_placeholder: bool,
    check_audio: bool,
) -> tuple[list[list[str]], int]:
    """Validated CSV rows of one split and the number of untranscribed audio files skipped."""
    scan = _scan_split(root, split)
    ids = sorted(scan.texts.keys() & scan.audio.keys(), key=_sort_key)
    if n_sentences is not None:
        ids = ids[:n_sentences]
    paths = [scan.audio[u] for u in ids]
    headers = read_headers(paths, num_workers, check_audio) if not scan.errors else []
    rows: list[list[str]] = []
    errors = scan.errors
    for utt_id, path, head in zip(ids, paths, headers, strict=False):
        if isinstance(head, str):
            errors.append(head)
            continue
        sample_rate, channels, frames = head
        if sample_rate != SAMPLERATE or channels != 1:
            errors.append(
                f"{path}: expected 16000 Hz mono audio, found {sample_rate} Hz with "
                f"{channels} channel(s)"
            )
            continue
        wav = (
            f"{DATA_ROOT_PLACEHOLDER}/{os.path.relpath(path, root)}"
            if data_root_placeholder
            else path
        )
        spk_id = utt_id.rsplit("-", 1)[0]
        rows.append([utt_id, str(frames / sample_rate), wav, spk_id, scan.texts[utt_id]])
    if not errors and not rows:
        errors.append(
            f"split {root / split} holds no transcribed {AUDIO_EXT} utterances "
            "(expected <speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac files)"
        )
    if errors:
        raise LibriSpeechPrepError(problems_message(errors, root / split))
    if scan.untranscribed:
        logger.warning(
            "%s: skipped %d audio file(s) without a transcript line, e.g. %s",
            split,
            len(scan.untranscribed),
            ", ".join(scan.untranscribed[:3]),
        )
    return rows, len(scan.untranscribed)


def listed(lines: Sequence[str], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """The first ``limit`` of ``lines``, one per indented line, and how many more there are."""
    more = len(lines) - limit
    tail = f"\n  … and {more} more" if more > 0 else ""
    return "\n  " + "\n  ".join(lines[:limit]) + tail


def problems_message(errors: Sequence[str], where: str | os.PathLike) -> str:
    """The error table of ``where``: how many problems, that no CSV was written, and the first
    ``MAX_LISTED_PROBLEMS`` of them, one per line."""
    return f"{len(errors)} problem(s) in {where}; no CSV was written for it:{listed(errors)}"


def write_csv(path: Path, rows: Iterable[Sequence[str]]) -> int:
    """Write header + rows atomically; returns the number of rows."""
    n = 0
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(CSV_HEADER)
        for row in rows:
            writer.writerow(row)
            n += 1
    return n


def _read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != CSV_HEADER:
            raise LibriSpeechPrepError(f"{path}: expected CSV header {','.join(CSV_HEADER)}")
        return list(reader)


# --------------------------------------------------------------------------- lexicon


def _find_lexicon(create_lexicon: bool | str, save_folder: Path, root: Path) -> Path:
    if isinstance(create_lexicon, (str, os.PathLike)) and not isinstance(create_lexicon, bool):
        path = Path(create_lexicon)
        if not path.is_file():
            raise LibriSpeechPrepError(f"lexicon file {path} does not exist")
        return path
    candidates = [save_folder / LEXICON_FILE, root / LEXICON_FILE, root.parent / LEXICON_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise LibriSpeechPrepError(
        f"create_lexicon needs {LEXICON_FILE} ({LEXICON_URL}); nothing is downloaded here: "
        f"pass its local path as create_lexicon or place it at {candidates[0]}"
    )


def _lexicon_rows(lexicon: Path) -> list[list[str]]:
    rows = []
    with open(lexicon, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise LibriSpeechPrepError(
                    f"{lexicon}:{line_no}: expected 'WORD PHONE [PHONE ...]', got {line.strip()!r}"
                )
            word, phones = parts[0], [p.strip("0123456789") for p in parts[1:]]
            rows.append([str(len(rows)), str(len(word)), " ".join(word), " ".join(phones)])
    return rows


def _write_lexicon(save_folder: Path, lexicon: Path, record: dict) -> None:
    """lexicon.csv and a seeded 98/1/1 split into lexicon_{tr,dev,test}.csv (G2P training)."""
    options = {"lexicon": str(lexicon.resolve()), "lexicon_sha256": _file_sha256(lexicon)}
    names = ["lexicon.csv", "lexicon_tr.csv", "lexicon_dev.csv", "lexicon_test.csv"]
    if all(_is_current(save_folder, record, n, options) for n in names):
        return
    rows = _lexicon_rows(lexicon)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    n_tr, n_dev = int(0.98 * len(rows)), int(0.01 * len(rows))
    parts = [rows, shuffled[:n_tr], shuffled[n_tr : n_tr + n_dev], shuffled[n_tr + n_dev :]]
    for name, part in zip(names, parts, strict=True):
        with atomic_open(save_folder / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "duration", "char", "phn"])
            writer.writerows(part)
        _remember(save_folder, record, name, options, rows=len(part))


# --------------------------------------------------------------------------- entry point


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _normalise_selection(
    select_n_sentences: int | Sequence[int | None] | None, splits: Sequence[str]
) -> list[int | None]:
    if select_n_sentences is None:
        return [None] * len(splits)
    if isinstance(select_n_sentences, int):
        return [select_n_sentences] * len(splits)
    selection = list(select_n_sentences)
    if len(selection) != len(splits):
        raise LibriSpeechPrepError(
            f"select_n_sentences has {len(selection)} value(s) but {len(splits)} split(s) "
            f"are prepared ({', '.join(splits)}): give one number per split, in the order "
            "tr_splits + dev_splits + te_splits"
        )
    for n in selection:
        if n is not None and (not isinstance(n, int) or n <= 0):
            raise LibriSpeechPrepError(f"select_n_sentences values must be positive, got {n!r}")
    return selection


def prepare_librispeech(
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    tr_splits: Sequence[str] = (),
    dev_splits: Sequence[str] = (),
    te_splits: Sequence[str] = (),
    select_n_sentences: int | Sequence[int | None] | None = None,
    merge_lst: Sequence[str] = (),
    merge_name: str | None = None,
    create_lexicon: bool | str = False,
    skip_prep: bool = False,
    num_workers: int | None = None,
    data_root_placeholder: bool = False,
    check_audio: bool = False,
) -> dict[str, int]:
    """Write ``<save_folder>/<split>.csv`` for every split, and the merged CSV if asked.

    Arguments
    ---------
    data_folder: the LibriSpeech folder, or the folder that holds ``LibriSpeech/``.
    save_folder: where the CSVs and ``librispeech_prepare.json`` go.
    tr_splits, dev_splits, te_splits: split folder names, e.g. ``["train-clean-100"]``.
    select_n_sentences: keep the first N utterances (sorted by ID) of each split: one
        number per split in the order tr_splits + dev_splits + te_splits (as SpeechBrain
        indexes it), or one int for all; None keeps everything.
    merge_lst, merge_name: splits to concatenate into ``merge_name`` (e.g. ``train.csv``).
    create_lexicon: False, True (use a local ``librispeech-lexicon.txt`` found in the save
        or data folder) or the lexicon's path; writes lexicon.csv and its G2P splits.
    skip_prep: do nothing.
    num_workers: processes reading audio headers (default: all available cores).
    data_root_placeholder: write ``wav`` as ``$data_root/<split>/…`` (relative to the
        LibriSpeech folder) instead of absolute paths; recipes replace ``$data_root`` with
        ``librispeech_root(data_folder)``.
    check_audio: also decode every selected file to find damage past the header (slow).

    Returns the number of rows of each CSV prepared or found up to date, by file name.
    """
    if skip_prep:
        return {}
    splits = [*tr_splits, *dev_splits, *te_splits]
    if len(set(splits)) != len(splits):
        raise LibriSpeechPrepError(f"a split is listed twice: {splits}")
    selection = _normalise_selection(select_n_sentences, splits)
    if merge_lst and not merge_name:
        raise LibriSpeechPrepError("merge_lst is given but merge_name is not (e.g. train.csv)")
    unknown = [s for s in merge_lst if s not in splits]
    if unknown:
        raise LibriSpeechPrepError(
            f"merge_lst names {unknown} which are not among the prepared splits {splits}"
        )
    root = librispeech_root(data_folder)
    save = Path(save_folder)
    save.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(save)
    record = _load_record(save)
    workers = num_workers if num_workers else available_cores()

    options_of = {
        split: {
            "data_root": str(root),
            "split": split,
            "select_n_sentences": n,
            "data_root_placeholder": data_root_placeholder,
        }
        for split, n in zip(splits, selection, strict=True)
    }
    todo = [s for s in splits if not _is_current(save, record, f"{s}.csv", options_of[s])]
    if todo:
        _check_splits(root, todo)
    counts: dict[str, int] = {}
    for split in splits:
        name = f"{split}.csv"
        if split not in todo:
            logger.info("%s is up to date, not re-preparing it", save / name)
            counts[name] = record["files"][name]["rows"]
            continue
        logger.info("preparing %s from %s", save / name, root / split)
        rows, skipped = _split_rows(
            root,
            split,
            selection[splits.index(split)],
            workers,
            data_root_placeholder,
            check_audio,
        )
        counts[name] = write_csv(save / name, rows)
        _remember(save, record, name, options_of[split], rows=counts[name], skipped=skipped)

    if merge_lst:
        merge_options = {
            "merge_lst": list(merge_lst),
            "sources": [record["files"][f"{s}.csv"]["sha256"] for s in merge_lst],
        }
        if _is_current(save, record, merge_name, merge_options):
            counts[merge_name] = record["files"][merge_name]["rows"]
        else:
            logger.info("merging %s into %s", ", ".join(merge_lst), save / merge_name)
            merged = (row for s in merge_lst for row in _read_csv_rows(save / f"{s}.csv"))
            counts[merge_name] = write_csv(save / merge_name, merged)
            _remember(save, record, merge_name, merge_options, rows=counts[merge_name])

    if create_lexicon:
        _write_lexicon(save, _find_lexicon(create_lexicon, save, root), record)
    return counts


# --------------------------------------------------------------------------- CLI


def _librispeech_speaker(spk_id: str) -> str:
    return spk_id.split("-")[0]  # LibriSpeech's spk_id is <speaker>-<chapter>


def summarize(
    save_folder: str | os.PathLike,
    names: Iterable[str],
    speaker: Callable[[str], str] = _librispeech_speaker,
) -> str:
    """A table of the manifests: utterances, hours, speakers (``speaker(spk_id)`` counted),
    words, vocabulary."""
    lines = [f"{'manifest':<24} {'utts':>8} {'hours':>7} {'speakers':>8} {'words':>9} {'vocab':>7}"]
    for name in names:
        rows = _read_csv_rows(Path(save_folder) / name)
        words = [w for r in rows for w in r[4].split()]
        speakers = {speaker(r[3]) for r in rows}
        hours = sum(float(r[1]) for r in rows) / 3600
        lines.append(
            f"{name:<24} {len(rows):>8} {hours:>7.2f} {len(speakers):>8} {len(words):>9} "
            f"{len(set(words)):>7}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write SpeechBrain CSV manifests (ID,duration,wav,spk_id,wrd) for LibriSpeech.",
        epilog="Example: python librispeech_prepare.py --data_folder /data/LibriSpeech "
        "--save_folder results/prepared --tr_splits train-clean-100 --dev_splits dev-clean "
        "--te_splits test-clean test-other --merge_lst train-clean-100 --merge_name train.csv",
    )
    p.add_argument("--data_folder", required=True, help="LibriSpeech folder or its parent")
    p.add_argument("--save_folder", required=True, help="where the CSVs are written")
    p.add_argument("--tr_splits", nargs="*", default=[], help="training splits")
    p.add_argument("--dev_splits", nargs="*", default=[], help="validation splits")
    p.add_argument("--te_splits", nargs="*", default=[], help="test splits")
    p.add_argument(
        "--select_n_sentences",
        nargs="*",
        type=int,
        default=None,
        help="first N utterances of each split (one number per split, or one for all)",
    )
    p.add_argument("--merge_lst", nargs="*", default=[], help="splits to merge")
    p.add_argument("--merge_name", default=None, help="merged CSV name, e.g. train.csv")
    p.add_argument(
        "--create_lexicon",
        nargs="?",
        const=True,
        default=False,
        metavar="LEXICON_TXT",
        help="write lexicon CSVs from a local librispeech-lexicon.txt (path optional)",
    )
    p.add_argument("--num_workers", type=int, default=None, help="processes (default: cores)")
    p.add_argument(
        "--data_root_placeholder",
        action="store_true",
        help="write wav paths as $data_root/<split>/... so the dataset can move",
    )
    p.add_argument(
        "--check_audio", action="store_true", help="decode every file to find corrupt audio"
    )
    p.add_argument("--skip_prep", action="store_true", help="do nothing")
    p.add_argument("--quiet", action="store_true", help="no summary table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    selection = args.select_n_sentences
    if selection is not None and len(selection) == 1:
        selection = selection[0]
    try:
        counts = prepare_librispeech(
            args.data_folder,
            args.save_folder,
            args.tr_splits,
            args.dev_splits,
            args.te_splits,
            selection,
            args.merge_lst,
            args.merge_name,
            args.create_lexicon,
            args.skip_prep,
            args.num_workers,
            args.data_root_placeholder,
            args.check_audio,
        )
    except LibriSpeechPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if counts and not args.quiet:
        print(summarize(args.save_folder, counts))
    return 0
