"""CSV manifests (ID,duration,wav,spk_id,wrd) of a user's own corpus, for the recipes.

``prepare_folder.py`` at the top of the repository is the command line. A corpus is either

* a folder: every audio file under it (recursively, hidden entries skipped; the extensions
  libsndfile reads, ``audio_files.AUDIO_EXTENSIONS``) with a same-named ``.txt`` transcript
  beside it (``a/b.flac`` + ``a/b.txt``; several lines are joined), or
* a TSV file of ``path<TAB>text[<TAB>speaker]`` lines (paths absolute or relative to the TSV's
  folder; a first line ``path<TAB>text...`` is a header).

``ID`` is the file's stem, or its path relative to the corpus (``/`` -> ``-``) where stems
repeat; commas and whitespace become ``_`` and a clash gets ``-2``, ``-3``, ... ``spk_id`` is
the TSV's third column, else the parent folder's name (folders), else the stem's prefix before
its first ``-`` or ``_``, else ``unknown``. ``duration`` comes from the audio header (no
decoding); ``wav`` is an absolute path. ``wrd`` is the transcript normalised to the recipe's
characters (:mod:`mamba_asr.transcript_text`).

Problems are handled as follows:

=====================================================  ==========================================
case                                                   handling
=====================================================  ==========================================
source missing, or neither a folder nor a file         error
TSV line without a tab or path, duplicate path        error (file and line number)
transcript or TSV not UTF-8 (a BOM is allowed)         error (file and line number)
TSV line whose audio file is missing                   error
two audio files sharing one transcript (a.wav, a.flac) error
empty, unreadable, truncated or non-audio file         error (truncation past the header only
                                                       with ``check_audio``)
audio without transcript, transcript without audio     reported (warning), left out
text outside the characters after normalisation, or    reported per line (warning), left out; the
empty                                                  list is written to ``<name>_left_out.txt``
sample rate other than 16 kHz, several channels        reported (the recipes resample and average
                                                       on loading), or converted with ``resample``
no utterance left                                      error
=====================================================  ==========================================

Errors are collected for the whole corpus and raised together (one
:class:`FolderPrepError`) before anything is written; the CSV is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile

from mamba_asr.atomic import atomic_open, atomic_path, remove_stale_temporaries
from mamba_asr.audio_files import AUDIO_EXTENSIONS, AudioError, audio_duration
from mamba_asr.audio_info import AudioInfo, format_summary, read_audio_info
from mamba_asr.command_line import ConfigError
from mamba_asr.librispeech import (
    SAMPLERATE,
    available_cores,
    listed,
    problems_message,
    read_headers,
    summarize,
    write_csv,
)
from mamba_asr.transcript_text import LIBRISPEECH_CHARACTERS, normalise, problem

logger = logging.getLogger(__name__)

TRANSCRIPT_SUFFIX = ".txt"
RESAMPLE_RECORD = "resampled.json"
UNKNOWN_SPEAKER = "unknown"
_UNSAFE = re.compile(r"[\s,]+")


class FolderPrepError(ConfigError):
    """The corpus cannot be turned into a manifest; the message lists every problem."""


@dataclass
class Utterance:
    """One audio file and its transcript as found in the corpus."""

    audio: Path
    text: str  # as written; the lines of a multi-line transcript joined by newlines
    transcript: Path  # the file holding the text (.txt or TSV), for reports
    line: int  # the text's first line in that file
    speaker: str
    relative: Path  # the audio's path relative to the corpus, for IDs


@dataclass
class FolderManifest:
    """What :func:`prepare_folder` wrote and left out."""

    csv: Path
    rows: int
    left_out: list[str] = field(default_factory=list)  # "<file>:<line>: ..." per utterance
    unpaired: list[str] = field(default_factory=list)  # audio or transcripts without a partner
    formats: str | None = None  # what loading changes (rates, channels), None: all 16 kHz mono
    converted: int = 0  # files resampled into the cache by this call
    reused: int = 0  # files found converted in the cache


# --------------------------------------------------------------------------- reading the corpus


def _stem_speaker(path: Path) -> str:
    match = re.match(r"([^-_]+)[-_]", path.stem)
    return match.group(1) if match else UNKNOWN_SPEAKER


def _read_text(path: Path, errors: list[str]) -> list[str] | None:
    """The lines of a UTF-8 text file (a BOM allowed), or None with the error recorded."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        errors.append(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})")
        return None


def scan_folder(folder: Path) -> tuple[list[Utterance], list[str], list[str]]:
    """``(utterances, errors, unpaired)`` of a folder corpus (see the module docstring)."""
    utterances: list[Utterance] = []
    errors: list[str] = []
    audio_of: dict[Path, list[Path]] = {}
    transcripts: dict[Path, Path] = {}  # by the name with a lower-case .txt

    def unlistable(exc: OSError) -> None:
        errors.append(f"{exc.filename}: folder cannot be listed: {exc.strerror}")

    for root, dirs, files in os.walk(folder, onerror=unlistable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root, name)
            if name.startswith("."):
                continue
            if path.suffix.lower() == TRANSCRIPT_SUFFIX:
                transcripts[path.with_suffix(TRANSCRIPT_SUFFIX)] = path
            elif path.suffix.lower() in AUDIO_EXTENSIONS:
                audio_of.setdefault(path.with_suffix(TRANSCRIPT_SUFFIX), []).append(path)
    unpaired = [f"{transcripts[t]}: transcript without an audio file"
                for t in sorted(transcripts.keys() - audio_of.keys())]
    for key, audio in sorted(audio_of.items()):
        if key not in transcripts:
            unpaired += [f"{a}: audio file without a transcript ({key.name})" for a in audio]
            continue
        transcript = transcripts[key]
        if len(audio) > 1:
            names = ", ".join(a.name for a in audio)
            errors.append(f"{transcript}: several audio files share this transcript ({names})")
            continue
        lines = _read_text(transcript, errors)
        if lines is None:
            continue
        relative = audio[0].relative_to(folder)
        parent = relative.parent.name
        utterances.append(Utterance(
            audio[0], "\n".join(lines), transcript, 1, parent or _stem_speaker(audio[0]),
            relative,
        ))
    return utterances, errors, unpaired


def read_tsv(tsv: Path) -> tuple[list[Utterance], list[str], list[str]]:
    """``(utterances, errors, [])`` of a TSV corpus (see the module docstring)."""
    utterances: list[Utterance] = []
    errors: list[str] = []
    lines = _read_text(tsv, errors) or []
    base = tsv.parent
    seen: dict[Path, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{tsv}:{number}"
        if number == 1 and fields[0].strip().lower() == "path":
            continue
        if len(fields) not in (2, 3) or not fields[0].strip():
            errors.append(
                f"{where}: expected 'path<TAB>text' or 'path<TAB>text<TAB>speaker', got "
                f"{line[:60]!r}"
            )
            continue
        # relative to the TSV's folder; an absolute path stays as it is
        audio = Path(os.path.normpath(base / os.path.expanduser(fields[0].strip())))
        if audio in seen:
            errors.append(f"{where}: {fields[0]} is listed twice (first on line {seen[audio]})")
            continue
        seen[audio] = number
        if not audio.is_file():
            errors.append(f"{where}: audio file {audio} does not exist")
            continue
        speaker = fields[2].strip() if len(fields) == 3 and fields[2].strip() else None
        relative = Path(os.path.relpath(audio, base)) if audio.is_relative_to(base) else audio
        utterances.append(Utterance(
            audio, fields[1], tsv, number, speaker or _stem_speaker(audio),
            Path(*relative.parts[1:]) if relative.is_absolute() else relative,
        ))
    return utterances, errors, []


def _ids(utterances: Sequence[Utterance]) -> list[str]:
    """Unique, comma-free IDs: the stem, or the relative path where stems repeat."""
    stems = Counter(u.relative.stem for u in utterances)
    ids: list[str] = []
    taken: set[str] = set()
    for u in utterances:
        name = u.relative.stem
        if stems[name] > 1:
            name = "-".join((*u.relative.parent.parts, u.relative.stem))
        name = _UNSAFE.sub("_", name)
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique)
        ids.append(unique)
    return ids


# --------------------------------------------------------------------------- resampling


def _source_facts(path: Path) -> dict:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_name(source: Path) -> str:
    """``<stem>-<hash of the absolute path>.flac``: one name per source file, so corpora
    prepared into one cache (train, dev, ...) never share a converted file."""
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    return f"{source.stem}-{digest}.flac"


def _convert(source: Path, target: Path) -> None:
    """``source`` as 16 kHz mono 16-bit FLAC at ``target`` (atomically)."""
    from mamba_asr.audio_io import load_audio  # torch and SpeechBrain: only for --resample

    wave = load_audio(source, SAMPLERATE).numpy()
    with atomic_path(target) as tmp:
        soundfile.write(tmp, np.clip(wave, -1.0, 1.0), SAMPLERATE, format="FLAC",
                        subtype="PCM_16")


def _resample(
    items: list[tuple[str, Path]], cache: Path, errors: list[str]
) -> tuple[dict[str, Path], int, int]:
    """``{ID: converted file}`` for ``items`` (ID, source), converting those not converted
    from the same source file (path, size, mtime) before (recorded in ``resampled.json``);
    ``(files, converted, reused)``."""
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache)
    record_path = cache / RESAMPLE_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        record = {}
    done: dict[str, Path] = {}
    converted = reused = 0
    try:
        for utt_id, source in items:
            target = cache / _cache_name(source)
            facts = _source_facts(source)
            if record.get(target.name) == facts and target.is_file():
                reused += 1
            else:
                try:
                    _convert(source, target)
                except AudioError as exc:
                    errors.append(str(exc))
                    continue
                record[target.name] = facts
                converted += 1
            done[utt_id] = target
    finally:
        with atomic_open(record_path, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    return done, converted, reused


# --------------------------------------------------------------------------- entry point


def _text_problem(utt: Utterance, characters: str) -> str:
    """``<file>:<line>: '<line>' contains 'x' (what it is)`` for the first line of ``utt``
    holding a character outside ``characters``."""
    for offset, line in enumerate(utt.text.split("\n")):
        bad = normalise(line, characters)[1]
        if bad is not None:
            return (f"{utt.transcript}:{utt.line + offset}: {line.strip()[:80]!r} contains "
                    f"{bad!r} ({problem(bad)})")
    raise AssertionError("normalise found a character the lines of the text do not hold")


def _normalised(
    utterances: list[Utterance], characters: str
) -> tuple[list[tuple[Utterance, str]], list[str]]:
    """``(utterance, normalised text)`` of those whose text fits ``characters``, and the
    report lines of the others."""
    kept: list[tuple[Utterance, str]] = []
    left_out: list[str] = []
    for utt in utterances:
        text, bad = normalise(utt.text, characters)
        if not text:
            left_out.append(f"{utt.transcript}:{utt.line}: empty transcript")
        elif bad is not None:
            left_out.append(_text_problem(utt, characters))
        else:
            kept.append((utt, text))
    return kept, left_out


def _headers(
    paths: list[str], workers: int, check_audio: bool, errors: list[str]
) -> dict[str, AudioInfo]:
    """Header facts by path, read by ``workers`` processes; unreadable files go to ``errors``."""
    infos: dict[str, AudioInfo] = {}
    for path, head in zip(paths, read_headers(paths, workers, check_audio), strict=True):
        if isinstance(head, str):
            errors.append(_unreadable(Path(path), head))
        else:
            infos[path] = AudioInfo(*head)
    return infos


def _unreadable(path: Path, message: str) -> str:
    """The reason ``audio_files`` gives for a file whose header cannot be read (with how to
    convert a container libsndfile does not read), else ``message``."""
    try:
        audio_duration(path)
    except AudioError as exc:
        return str(exc)
    return message


def prepare_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    name: str = "train",
    characters: str = LIBRISPEECH_CHARACTERS,
    resample: str | os.PathLike | None = None,
    num_workers: int | None = None,
    check_audio: bool = False,
) -> FolderManifest:
    """Write ``<out>/<name>.csv`` from the folder or TSV ``source``.

    Arguments
    ---------
    source: a folder of audio files with same-named ``.txt`` transcripts, or a TSV file.
    out: where the CSV (and ``<name>_left_out.txt``, when utterances are left out) go.
    name: the CSV's name without ``.csv``.
    characters: the recipe's characters; transcripts are normalised to them.
    resample: a cache folder: files not at 16 kHz mono are converted there once, to 16 kHz
        mono FLAC, and the manifest points to the converted files.
    num_workers: processes reading audio headers (default: all available cores).
    check_audio: also decode every file to find damage past its header (slow).

    Raises FolderPrepError listing every error; nothing is written then.
    """
    source = Path(os.path.abspath(source))
    if source.is_dir():
        utterances, errors, unpaired = scan_folder(source)
    elif source.is_file():
        utterances, errors, unpaired = read_tsv(source)
    else:
        raise FolderPrepError(
            f"{source} does not exist: expected a folder of audio files with same-named "
            f"{TRANSCRIPT_SUFFIX} transcripts, or a TSV file of path<TAB>text lines"
        )
    kept, left_out = _normalised(utterances, characters)
    ids = _ids([u for u, _ in kept])
    paths = [str(u.audio) for u, _ in kept]
    infos = _headers(paths, num_workers or available_cores(), check_audio, errors)
    if not errors and not infos:
        errors.append(f"{source} holds no utterance with a usable transcript "
                      f"({len(left_out)} left out, {len(unpaired)} unpaired file(s))")
    if errors:
        raise FolderPrepError(problems_message(errors, source))

    formats = format_summary(infos, SAMPLERATE)
    wav = {i: Path(p) for i, p in zip(ids, paths, strict=True)}
    converted = reused = 0
    if resample is not None and formats is not None:
        odd = [(i, wav[i]) for i in ids
               if infos[str(wav[i])].sample_rate != SAMPLERATE or infos[str(wav[i])].channels != 1]
        done, converted, reused = _resample(odd, Path(os.path.abspath(resample)), errors)
        if errors:
            raise FolderPrepError(problems_message(errors, source))
        for utt_id, target in done.items():
            infos[str(target)] = read_audio_info(str(target))
            wav[utt_id] = target
        formats = None
    rows = []
    for utt_id, (utt, text) in zip(ids, kept, strict=True):
        info = infos[str(wav[utt_id])]
        speaker = _UNSAFE.sub("_", utt.speaker)
        rows.append([utt_id, str(info.num_frames / info.sample_rate), str(wav[utt_id]), speaker,
                     text])

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    csv_path = out / f"{name}.csv"
    report = out / f"{name}_left_out.txt"
    n_rows = write_csv(csv_path, rows)
    if left_out or unpaired:
        with atomic_open(report, "w", encoding="utf-8") as f:
            f.writelines(f"{line}\n" for line in [*left_out, *unpaired])
    else:
        report.unlink(missing_ok=True)
    result = FolderManifest(csv_path, n_rows, left_out, unpaired, formats, converted, reused)
    _log(result, report)
    return result


def _log(result: FolderManifest, report: Path) -> None:
    if result.left_out:
        logger.warning(
            "left out %d utterance(s) whose transcript cannot be written in the model's "
            "characters (all listed in %s):%s", len(result.left_out), report,
            listed(result.left_out),
        )
    if result.unpaired:
        logger.warning("left out %d file(s) without a partner:%s", len(result.unpaired),
                       listed(result.unpaired))
    if result.formats is not None:
        logger.warning("%s by the recipes (--resample CACHE converts them once, to 16 kHz mono "
                       "FLAC)", result.formats)
    if result.converted or result.reused:
        logger.info("resampled %d file(s) to 16 kHz mono FLAC, reused %d converted before",
                    result.converted, result.reused)


# --------------------------------------------------------------------------- CLI


def hparams_characters(path: str | os.PathLike) -> str:
    """The ``characters`` of a recipe's YAML (read as plain YAML: nothing is built); the
    LibriSpeech characters for a YAML without them (the SentencePiece recipes, trained on
    them)."""
    import ruamel.yaml

    path = Path(path)
    try:
        config = ruamel.yaml.YAML(typ="rt").load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FolderPrepError(f"--hparams {path}: cannot be read ({exc.strerror})") from exc
    except ruamel.yaml.YAMLError as exc:
        raise FolderPrepError(f"--hparams {path}: not a YAML file ({exc})") from exc
    value = config.get("characters") if isinstance(config, dict) else None
    if value is None:
        logger.info("%s has no characters key: normalising to %r", path, LIBRISPEECH_CHARACTERS)
        return LIBRISPEECH_CHARACTERS
    if not isinstance(value, str) or not value:
        raise FolderPrepError(f"--hparams {path}: characters must be a non-empty string, "
                              f"not {value!r}")
    return str(value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a SpeechBrain CSV manifest (ID,duration,wav,spk_id,wrd) from a folder "
        "of audio files with same-named .txt transcripts, or from a TSV of path<TAB>text lines.",
        epilog="Example: python prepare_folder.py my_corpus/train --out results/my_prep "
        "--name train --resample results/my_16k",
    )
    p.add_argument("source", help="corpus folder, or TSV file (path<TAB>text[<TAB>speaker])")
    p.add_argument("--out", required=True, help="folder the CSV is written to")
    p.add_argument("--name", default="train", help="CSV name without .csv (default: train)")
    chars = p.add_mutually_exclusive_group()
    chars.add_argument("--characters", default=None,
                       help=f"the model's characters (default: {LIBRISPEECH_CHARACTERS!r})")
    chars.add_argument("--hparams", default=None,
                       help="take the characters from this recipe YAML (its characters key)")
    p.add_argument("--resample", default=None, metavar="CACHE",
                   help="convert audio not at 16 kHz mono once into CACHE (16 kHz mono FLAC)")
    p.add_argument("--num_workers", type=int, default=None, help="processes (default: cores)")
    p.add_argument("--check_audio", action="store_true",
                   help="decode every file to find damage past its header (slow)")
    p.add_argument("--quiet", action="store_true", help="no summary table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        characters = (
            hparams_characters(args.hparams) if args.hparams
            else args.characters or LIBRISPEECH_CHARACTERS
        )
        result = prepare_folder(args.source, args.out, args.name, characters, args.resample,
                                args.num_workers, args.check_audio)
    except FolderPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summarize(args.out, [result.csv.name], speaker=str))
    return 0
