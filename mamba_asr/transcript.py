"""Transcription results (words with times) and the output formats Whisper users know.

Every format is rendered from one list of cues (subtitle segments, :func:`segments`): ``txt``
writes one cue per line, ``srt`` and ``vtt`` are subtitles, ``tsv`` is Whisper's table of
``start<TAB>end<TAB>text`` in integer milliseconds and ``json`` is OpenAI's ``verbose_json``
transcription object (:func:`verbose_json`, described by :data:`JSON_SCHEMA`).
"""

from __future__ import annotations

import html
import itertools
import json
import math
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mamba_asr.atomic import atomic_open

FORMATS = ("txt", "json", "srt", "vtt", "tsv")
ALL_FORMATS = "all"


@dataclass
class Word:
    """One recognised word and where it was heard.

    ``word`` is the word as printed (no whitespace), ``start``/``end`` are seconds in the file's
    time (``0 <= start <= end``) and ``probability`` (0..1) is the model's confidence in it.
    """

    word: str
    start: float
    end: float
    probability: float

    def __post_init__(self) -> None:
        if not isinstance(self.word, str) or not self.word or any(c.isspace() for c in self.word):
            raise ValueError(f"Word.word must be a non-empty string without spaces: {self.word!r}")
        _check_seconds(self.start, f"word {self.word!r} start")
        _check_seconds(self.end, f"word {self.word!r} end")
        if self.end < self.start:
            raise ValueError(
                f"word {self.word!r} ends at {self.end} s, before its start ({self.start} s)"
            )
        if not _is_number(self.probability) or not 0.0 <= self.probability <= 1.0:
            raise ValueError(
                f"word {self.word!r} probability must be in 0..1, got {self.probability!r}"
            )


@dataclass
class Transcript:
    """What a model heard in one input.

    ``text`` is the words joined by single spaces (checked when there are words; a transcript
    without word times may still carry text, which only ``txt`` and ``json`` can show),
    ``duration`` the seconds of audio, ``words`` in time order without overlaps and inside the
    audio, ``source`` the input's name or path, ``timings`` seconds spent per stage (e.g.
    ``{"load": s, "encode": s}``) and ``language`` the language the model transcribes.
    """

    text: str
    duration: float
    words: list[Word]
    source: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    language: str = "english"

    def __post_init__(self) -> None:
        where = f" in {self.source}" if self.source else ""
        _check_seconds(self.duration, f"transcript duration{where}")
        for name, seconds in self.timings.items():
            _check_seconds(seconds, f"timing {name!r}{where}")
        for i, word in enumerate(self.words):
            if not isinstance(word, Word):
                kind = type(word).__name__
                raise TypeError(f"Transcript.words[{i}]{where} is a {kind}, not a Word")
            if i and word.start < self.words[i - 1].end:
                previous = self.words[i - 1]
                raise ValueError(
                    f"word {i} ({word.word!r}){where} starts at {word.start} s, before word {i - 1}"
                    f" ({previous.word!r}) ends at {previous.end} s: words must be in time order"
                )
        if self.words:
            last = self.words[-1]
            if last.end > self.duration:
                raise ValueError(
                    f"word {len(self.words) - 1} ({last.word!r}){where} ends at {last.end} s,"
                    f" after the end of the audio ({self.duration} s)"
                )
            joined = " ".join(w.word for w in self.words)
            if self.text != joined:
                raise ValueError(
                    f"Transcript.text{where} must be its words joined by single spaces:"
                    f" got {self.text!r}, words give {joined!r}"
                )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_seconds(value: object, what: str) -> None:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True)
class Cue:
    """One subtitle: consecutive words shown together, as ``lines`` of text.

    Its time is its first word's start to its last word's end.
    """

    words: tuple[Word, ...]
    lines: tuple[str, ...]

    @property
    def start(self) -> float:
        return self.words[0].start

    @property
    def end(self) -> float:
        return self.words[-1].end

    @property
    def text(self) -> str:
        """The cue's words on one line."""
        return " ".join(self.lines)


def segments(
    words: Sequence[Word],
    max_seconds: float = 7.0,
    max_line_chars: int = 42,
    max_lines: int = 2,
    pause: float = 1.0,
) -> list[Cue]:
    """Split ``words`` (in time order) into subtitle cues.

    A gap of ``pause`` seconds or more between two words always ends a cue (no subtitle stays
    on screen over silence). Within speech, a cue takes as many words as fit in
    ``max_seconds`` (first word's start to last word's end) and in ``max_lines`` lines of
    ``max_line_chars`` characters; when the next word does not fit, the cue ends at the longest
    gap between words among the breaks that keep at least half of those words in the cue
    (ties: the later break), so cues end at the speaker's pauses rather than mid-phrase without
    becoming fragments. Lines break between words, balanced (the longest line as short as
    possible; ties: the shorter line first). A single word that is longer than a line or
    ``max_seconds`` is a cue of its own. No words, no cues.
    """
    for name, value in (("max_seconds", max_seconds), ("pause", pause)):
        if not _is_number(value) or value <= 0:
            raise ValueError(f"segments: {name} must be a positive number, got {value!r}")
    for name, value in (("max_line_chars", max_line_chars), ("max_lines", max_lines)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"segments: {name} must be a positive integer, got {value!r}")
    cues: list[Cue] = []
    run_start = 0
    for run_end in _pause_breaks(words, pause):
        i = run_start
        while i < run_end:
            j = i + 1  # words[i:j] is the cue so far
            while j < run_end and _fits(words[i : j + 1], max_seconds, max_line_chars, max_lines):
                j += 1
            if j < run_end:
                j = _longest_gap_break(words, i, j)
            texts = [w.word for w in words[i:j]]
            cues.append(Cue(tuple(words[i:j]), _balanced_lines(texts, max_line_chars, max_lines)))
            i = j
        run_start = run_end
    return cues


def _gap(words: Sequence[Word], k: int) -> float:
    """Seconds between ``words[k - 1]`` and ``words[k]``, to the millisecond (the outputs'
    resolution), so that float noise neither makes a pause nor breaks a tie."""
    return round(words[k].start - words[k - 1].end, 3)


def _pause_breaks(words: Sequence[Word], pause: float) -> list[int]:
    """End indices of the runs of ``words`` separated by gaps of ``pause`` seconds or more."""
    breaks = [k for k in range(1, len(words)) if _gap(words, k) >= pause]
    return [*breaks, len(words)] if words else []


def _fits(words: Sequence[Word], max_seconds: float, max_chars: int, max_lines: int) -> bool:
    """Whether ``words`` last at most ``max_seconds`` and wrap into ``max_lines`` lines."""
    if words[-1].end - words[0].start > max_seconds:
        return False
    lines, width = 1, -1
    for w in words:  # filling each line greedily uses the fewest lines
        if width + 1 + len(w.word) <= max_chars or width < 0:
            width += 1 + len(w.word)
        else:
            lines, width = lines + 1, len(w.word)
        if width > max_chars:
            return False
    return lines <= max_lines


def _longest_gap_break(words: Sequence[Word], i: int, j: int) -> int:
    """Where a cue starting at ``i`` ends, given that ``words[i:j]`` fit and ``words[j]`` does
    not: the longest gap among the breaks ``k`` keeping at least half of them, latest on ties."""
    first = i + (j - i + 1) // 2
    return max(range(first, j + 1), key=lambda k: (_gap(words, k), k))


def _balanced_lines(texts: list[str], max_chars: int, max_lines: int) -> tuple[str, ...]:
    """``texts`` joined into the fewest lines (at most ``max_lines``) of at most ``max_chars``,
    the longest line as short as possible; the shortest longest line when nothing fits."""
    n = len(texts)
    ends = list(itertools.accumulate((len(t) + 1 for t in texts), initial=0))

    def width(a: int, b: int) -> int:
        return ends[b] - ends[a] - 1

    # best[k]: (longest line, where lines 2.. start) for texts[:k] in m lines, m = 1, 2, ...
    best: list[tuple[float, tuple[int, ...]]] = [(width(0, k), ()) for k in range(n + 1)]
    chosen = best[n]
    for m in range(2, min(max_lines, n) + 1):
        if chosen[0] <= max_chars:
            break
        previous, best = best, [(math.inf, ())] * (n + 1)
        for k in range(m, n + 1):
            for b in range(m - 1, k):  # the last line is texts[b:k]
                longest = max(previous[b][0], width(b, k))
                if longest < best[k][0]:
                    best[k] = (longest, (*previous[b][1], b))
        if best[n][0] < chosen[0]:
            chosen = best[n]
    bounds = [0, *chosen[1], n]
    return tuple(" ".join(texts[a:b]) for a, b in itertools.pairwise(bounds))


def _timestamp(seconds: float, decimal_marker: str) -> str:
    """``HH:MM:SS<marker>mmm`` (hours grow past 99 as needed)."""
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _seconds(value: float) -> float:
    """Seconds as written in JSON: rounded to the millisecond, like the subtitle formats."""
    return round(float(value), 3)


def compression_ratio(text: str) -> float:
    """Whisper's compression ratio: the text's UTF-8 bytes over their zlib-compressed size
    (repetitive text compresses well; Whisper treats a ratio above 2.4 as a failure)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def avg_logprob(words: Sequence[Word]) -> float:
    """The mean natural log of the words' probabilities (a probability of 0 counts as the
    smallest positive float, so the value stays finite)."""
    return sum(math.log(max(w.probability, sys.float_info.min)) for w in words) / len(words)


def verbose_json(t: Transcript, cues: Sequence[Cue] | None = None) -> dict:
    """``t`` as OpenAI's ``verbose_json`` transcription object (``TranscriptionVerbose``).

    Segments are the cues. Per segment: ``avg_logprob`` is the mean log of its word
    probabilities, ``compression_ratio`` Whisper's (:func:`compression_ratio`), ``tokens`` is
    empty (our models' tokens are characters or SentencePiece pieces, not the GPT token ids the
    field holds), ``temperature`` is 0.0 (the search is deterministic), ``seek`` is 0 (the
    offset, in 10 ms frames, of the window the segment was decoded in; the whole file is
    decoded in one pass) and ``no_speech_prob`` is 0.0 (the models have no no-speech
    estimate). Each word also carries Whisper's ``probability``; ``timings`` holds the seconds
    spent per stage. Times are seconds rounded to the millisecond.
    """
    cues = segments(t.words) if cues is None else cues
    return {
        "task": "transcribe",
        "language": t.language,
        "duration": _seconds(t.duration),
        "text": t.text,
        "segments": [
            {
                "id": n,
                "seek": 0,
                "start": _seconds(cue.start),
                "end": _seconds(cue.end),
                "text": cue.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": avg_logprob(cue.words),
                "compression_ratio": compression_ratio(cue.text),
                "no_speech_prob": 0.0,
            }
            for n, cue in enumerate(cues)
        ],
        "words": [
            {
                "word": w.word,
                "start": _seconds(w.start),
                "end": _seconds(w.end),
                "probability": w.probability,
            }
            for w in t.words
        ],
        "timings": dict(t.timings),
    }


_SECONDS = {"type": "number", "minimum": 0}

JSON_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Mamba-ASR transcription (OpenAI verbose_json)",
    "type": "object",
    "additionalProperties": False,
    "required": ["task", "language", "duration", "text", "segments", "words", "timings"],
    "properties": {
        "task": {"const": "transcribe"},
        "language": {"type": "string", "minLength": 1},
        "duration": _SECONDS,
        "text": {"type": "string"},
        "segments": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": [
                    "id", "seek", "start", "end", "text", "tokens", "temperature",
                    "avg_logprob", "compression_ratio", "no_speech_prob",
                ],
                "properties": {
                    "id": {"type": "integer", "minimum": 0},
                    "seek": {"type": "integer", "minimum": 0},
                    "start": _SECONDS,
                    "end": _SECONDS,
                    "text": {"type": "string", "minLength": 1},
                    "tokens": {"type": "array", "items": {"type": "integer"}},
                    "temperature": {"type": "number", "minimum": 0},
                    "avg_logprob": {"type": "number", "maximum": 0},
                    "compression_ratio": {"type": "number", "exclusiveMinimum": 0},
                    "no_speech_prob": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
        "words": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["word", "start", "end", "probability"],
                "properties": {
                    "word": {"type": "string", "pattern": r"^\S+$"},
                    "start": _SECONDS,
                    "end": _SECONDS,
                    "probability": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
        "timings": {"type": "object", "additionalProperties": _SECONDS},
    },
}


def _txt(t: Transcript, cues: Sequence[Cue]) -> str:
    lines = [cue.text for cue in cues] if cues else [t.text] if t.text else []
    return "".join(f"{line}\n" for line in lines)


def _srt(cues: Sequence[Cue]) -> str:
    return "".join(
        f"{n}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n"
        + "\n".join(c.lines)
        + "\n\n"
        for n, c in enumerate(cues, 1)
    )


def _vtt(cues: Sequence[Cue]) -> str:
    return "WEBVTT\n" + "".join(
        f"\n{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n"
        + "\n".join(html.escape(line, quote=False) for line in c.lines)
        + "\n"
        for c in cues
    )


def _tsv(cues: Sequence[Cue]) -> str:
    return "start\tend\ttext\n" + "".join(
        f"{round(1000 * c.start)}\t{round(1000 * c.end)}\t{c.text}\n" for c in cues
    )


def output_formats(name: str) -> tuple[str, ...]:
    """The formats an output-format option names: one of :data:`FORMATS`, or ``all``."""
    if name == ALL_FORMATS:
        return FORMATS
    if name in FORMATS:
        return (name,)
    choices = f"{', '.join(FORMATS)} or {ALL_FORMATS}"
    raise ValueError(f"unknown output format {name!r}: expected one of {choices}")


def render(t: Transcript, fmt: str, cues: Sequence[Cue] | None = None) -> str:
    """The text of ``t`` in format ``fmt`` (one of :data:`FORMATS`); ``cues`` defaults to
    ``segments(t.words)`` (pass them to share one segmentation between formats)."""
    if fmt not in FORMATS:
        also = f" ({ALL_FORMATS!r} is for write_transcripts)" if fmt == ALL_FORMATS else ""
        choices = ", ".join(FORMATS)
        raise ValueError(f"unknown output format {fmt!r}: expected one of {choices}{also}")
    cues = segments(t.words) if cues is None else cues
    if fmt == "json":
        return json.dumps(verbose_json(t, cues), ensure_ascii=False, indent=2) + "\n"
    if fmt == "txt":
        return _txt(t, cues)
    return {"srt": _srt, "vtt": _vtt, "tsv": _tsv}[fmt](cues)


def write_transcript(
    t: Transcript, fmt: str, out_dir: str | os.PathLike, stem: str,
    cues: Sequence[Cue] | None = None,
) -> Path:
    """Write ``<out_dir>/<stem>.<fmt>`` (UTF-8) atomically: the file is complete or absent.

    ``stem`` is a file name without a folder. Returns the path written.
    """
    if not stem or stem in (".", "..") or Path(stem).name != stem:
        raise ValueError(f"output file stem must be a file name without a folder, got {stem!r}")
    text = render(t, fmt, cues)
    path = Path(out_dir) / f"{stem}.{fmt}"
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return path


def write_transcripts(
    t: Transcript, name: str, out_dir: str | os.PathLike, stem: str,
    cues: Sequence[Cue] | None = None,
) -> list[Path]:
    """Write ``t`` in the format(s) ``name`` (a format or ``all``, :func:`output_formats`);
    returns the paths written, in :data:`FORMATS` order."""
    formats = output_formats(name)
    cues = segments(t.words) if cues is None else cues
    return [write_transcript(t, fmt, out_dir, stem, cues) for fmt in formats]
