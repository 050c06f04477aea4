"""Word times of the demo corpus: where each word's sound starts and ends in its FLAC file.

eSpeak NG reports where it starts each word's phonemes in its output (word events, to the
millisecond). It speaks a few word pairs as one ("there was", "on the"), with one event; the
later word then starts at its first phoneme (phoneme events, aligned with the phonemes eSpeak
gives the word alone). Between a word's position and the next word's (the end of the speech
for the last word), the word's sound is where the clean synthesised audio is louder than
``SILENCE_DB`` below the utterance's speech level (the 95th percentile of a 10 ms RMS
envelope), less a silence at either edge: a word that begins with a stop starts at its
burst, after the closure, and a word before a pause ends where its sound does. The builder
maps these on- and offsets through its resampling, trimming and padding into the file's time.

Each chapter stores them beside its transcript in ``<spk>-<chapter>.words.tsv``, one word a
line, ``utt_id<TAB>word<TAB>start<TAB>end`` in seconds with 3 decimals, utterances in
transcript order; ``librispeech_prepare`` reads only ``*.flac`` and ``*.trans.txt``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np

from mamba_asr.demo_corpus.espeak import PhonemeEvent, Speech

WORDS_SUFFIX = ".words.tsv"
TRANS_SUFFIX = ".trans.txt"
FIRST_VERSION = 3  # the first SPEC_VERSION of the corpus with word times
ENVELOPE_S = 0.010
SILENCE_DB = 40.0
LEVEL_PERCENTILE = 95

WordTime = tuple[str, float, float]  # (word, start, end), seconds in the file's time


class WordTimesError(ValueError):
    """A corpus folder holds no word times, or word times that do not fit its transcripts."""


def _plain(name: str) -> str:
    """A phoneme name without what changes between contexts: stress, length, r-colouring
    ("ˈɑːɹ" and "ɑː" -> "ɑ")."""
    plain = name.replace("ˈ", "").replace("ˌ", "").replace("ː", "")
    return plain[:-1] if len(plain) > 1 and plain.endswith("ɹ") else plain


def _merged_starts(
    words: list[str], phones: list[PhonemeEvent], phonemes_of: Callable[[str], list[str]]
) -> list[int]:
    """Index in ``phones`` (a group's phoneme events) where each of ``words`` starts: the
    first spoken phoneme matched to one of the word's own phonemes (difflib alignment)."""
    own = [(k, _plain(p)) for k, word in enumerate(words) for p in phonemes_of(word)]
    matcher = SequenceMatcher(None, [p for _, p in own], [_plain(p.name) for p in phones], False)
    first: dict[int, int] = {}
    for block in matcher.get_matching_blocks():
        for j in range(block.size):
            first.setdefault(own[block.a + j][0], block.b + j)
    starts = [first.get(k, -1) for k in range(len(words))]
    starts[0] = 0 if starts[0] == -1 else starts[0]
    if not phones or -1 in starts or starts != sorted(starts) or len(set(starts)) < len(starts):
        raise ValueError(
            f"cannot place {words} in the phonemes eSpeak NG spoke for them "
            f"({[p.name for p in phones]}; alone: {[phonemes_of(w) for w in words]})"
        )
    return starts


def word_starts_ms(text: str, speech: Speech, phonemes_of: Callable[[str], list[str]]) -> list[int]:
    """The start (ms in the engine's output) of each word of ``text`` (single spaces).

    A word's start is its word event. eSpeak speaks some word pairs as one ("there was",
    "on the", an h-dropping voice's "your huge"): the later words get no event, and start at
    the first of the group's phoneme events that matches one of their own phonemes (as eSpeak
    gives the word alone: ``phonemes_of``). ValueError when the events do not fit the words.
    (An event's ``length`` is not the word's: it counts "wasn't" as 4; only offsets count.)
    """
    words = text.split(" ")
    offsets = [sum(len(w) + 1 for w in words[:k]) for k in range(len(words))]
    event_of = {e.offset: k for k, e in enumerate(speech.words)}
    if len(event_of) != len(speech.words) or not event_of.keys() <= set(offsets):
        raise ValueError(
            f"eSpeak NG's word events at character offsets {[e.offset for e in speech.words]} "
            f"are not at distinct word starts of {text!r} ({offsets})"
        )
    groups: list[tuple[int, list[int]]] = []  # (word event or -1, words spoken with it)
    for k, offset in enumerate(offsets):
        if offset in event_of or not groups:
            groups.append((event_of.get(offset, -1), [k]))
        else:
            groups[-1][1].append(k)
    starts: list[int] = []
    for event, members in groups:
        group = [speech.words[event].ms] if event >= 0 else []
        if len(members) > len(group):
            phones = [p for p in speech.phonemes if p.word == event and p.name]
            first = _merged_starts([words[k] for k in members], phones, phonemes_of)
            group += [phones[i].ms for i in first[len(group) :]]
        starts += group
    return starts


def _sound(loud: np.ndarray, edge: int) -> tuple[int, int] | None:
    """[first, last + 1) of the sound in ``loud`` (bool, one word's samples) less a silence
    that touches either end: one that starts within ``edge`` samples of the start (where a
    centred envelope still hears the previous word) or ends within ``edge`` of the end.
    None when nothing is loud."""
    first, stop = 0, len(loud)
    quiet = np.flatnonzero(~loud[:edge])
    if quiet.size:
        after = np.flatnonzero(loud[quiet[0] :])
        if not after.size:
            return None
        first = int(quiet[0] + after[0])
    quiet = np.flatnonzero(~loud[max(first, stop - edge) :])
    if quiet.size:
        before = np.flatnonzero(loud[first : max(first, stop - edge) + quiet[-1]])
        if not before.size:
            return None
        stop = first + int(before[-1]) + 1
    return first, stop


def word_bounds(
    y: np.ndarray, starts: Sequence[int], onset: int, stop: int, rate: int
) -> list[tuple[int, int]]:
    """(start, end) sample indices of each word's sound in ``y``.

    ``y``: (samples,) float, the clean speech; ``starts``: the sample where each word's
    phonemes begin (its event), increasing; ``onset`` / ``stop``: the speech's first sample
    and one past its last. A word's sound is what lies between its start (clipped to
    [onset, stop]) and the next word's (or ``stop``), less a silence (envelope below the
    threshold) at either edge: a stop's closure or a pause. ValueError for a word without
    sound.
    """
    window = max(1, round(ENVELOPE_S * rate))
    envelope = np.sqrt(np.convolve(y.astype(np.float64) ** 2, np.ones(window) / window, "same"))
    level = np.percentile(envelope[onset:stop], LEVEL_PERCENTILE)
    loud = envelope > level * 10 ** (-SILENCE_DB / 20)
    clipped = [min(max(int(s), onset), stop) for s in starts]
    bounds = []
    for k, (start, nxt) in enumerate(zip(clipped, [*clipped[1:], stop], strict=True)):
        sound = _sound(loud[start:nxt], window)
        if sound is None:
            raise ValueError(f"word {k} has no sound between samples {start} and {nxt}")
        bounds.append((int(start + sound[0]), int(start + sound[1])))
    return bounds


def format_word_times(utterances: Iterable[tuple[str, Sequence[WordTime]]]) -> str:
    """The text of one ``.words.tsv``: ``(utt_id, [(word, start, end), ...])`` in order."""
    return "".join(
        f"{utt_id}\t{word}\t{start:.3f}\t{end:.3f}\n"
        for utt_id, words in utterances
        for word, start, end in words
    )


# --------------------------------------------------------------------------- reading


def _words_of(trans: Path) -> dict[str, list[str]]:
    """utt id -> words of one ``<spk>-<chapter>.trans.txt``."""
    lines = trans.read_text(encoding="utf-8").splitlines()
    return {utt: text.split() for utt, _, text in (line.partition(" ") for line in lines if line)}


def _parse(path: Path) -> dict[str, list[WordTime]]:
    """utt id -> word times of one ``.words.tsv``; WordTimesError naming the line when bad."""
    times: dict[str, list[WordTime]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        try:
            utt, word, start, end = fields[0], fields[1], float(fields[2]), float(fields[3])
            if len(fields) != 4:
                raise ValueError
        except (ValueError, IndexError):
            raise WordTimesError(
                f"{path}:{line_no}: {line[:60]!r} is not 'utt_id<TAB>word<TAB>start<TAB>end' "
                "(seconds)"
            ) from None
        previous = times.setdefault(utt, [])
        if not 0 <= start < end or (previous and start < previous[-1][2]):
            raise WordTimesError(
                f"{path}:{line_no}: {word} at {start:.3f}-{end:.3f} s: expected "
                "0 <= start < end, starting at or after the previous word's end"
            )
        previous.append((word, start, end))
    return times


def _version_problem(librispeech: Path) -> str | None:
    """Why the corpus at ``librispeech`` has no word times, by its build stamp (if any)."""
    from mamba_asr.demo_corpus.corpus import read_stamp  # corpus imports this module

    version = (read_stamp(librispeech.parent) or {}).get("spec_version")
    if isinstance(version, int) and version < FIRST_VERSION:
        return f"it was built by demo-corpus version {version}; word times came in version 3"
    return None


def read_word_times(data_folder: str | os.PathLike, split: str) -> dict[str, list[WordTime]]:
    """utt id -> [(word, start, end), ...] of every utterance of ``split``.

    ``data_folder`` is the recipes' (the folder holding ``LibriSpeech/`` or that folder).
    WordTimesError when the split has no word times (a corpus older than version 3, or not
    the demo corpus) or when they do not match its transcripts word for word.
    """
    from mamba_asr.librispeech import librispeech_root

    root = librispeech_root(data_folder)
    folder = root / split
    if not folder.is_dir():
        present = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
        raise WordTimesError(f"{folder}: no such split folder (splits there: {present})")
    rebuild = f"rebuild it with: python -m mamba_asr.demo_corpus --out {root.parent}"
    if (why := _version_problem(root)) is not None:
        raise WordTimesError(f"{root} has no word times: {why}; {rebuild}")
    times: dict[str, list[WordTime]] = {}
    for trans in sorted(folder.glob(f"*/*/*{TRANS_SUFFIX}")):
        path = trans.with_name(trans.name[: -len(TRANS_SUFFIX)] + WORDS_SUFFIX)
        if not path.is_file():
            raise WordTimesError(
                f"{path} is missing: {folder} has no word times for {trans.name} (a demo "
                f"corpus older than version 3, or not the demo corpus); {rebuild}"
            )
        chapter, transcript = _parse(path), _words_of(trans)
        for utt, words in transcript.items():
            got = [w for w, _, _ in chapter.get(utt, [])]
            if got != words:
                raise WordTimesError(
                    f"{path}: the word times of {utt} name {got}, its transcript "
                    f"{trans.name} says {words}"
                )
        if extra := sorted(chapter.keys() - transcript.keys()):
            raise WordTimesError(f"{path}: utterances {extra} are not in {trans.name}")
        times.update(chapter)
    if not times:
        raise WordTimesError(f"{folder} holds no transcripts (*{TRANS_SUFFIX})")
    return times
