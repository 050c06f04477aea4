"""Transcript output formats: each parses by its own rules with its real parser (srt, webvtt-py,
csv, jsonschema + the openai client's TranscriptionVerbose), and the cues follow the subtitle
rules (duration, lines, pauses, times)."""

from __future__ import annotations

import csv
import html
import io
import itertools
import json
import math
import random
import re
import zlib
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
import srt
import webvtt
from openai.types.audio import TranscriptionVerbose

from mamba_asr.atomic import TMP_MARK
from mamba_asr.transcript import (
    FORMATS,
    JSON_SCHEMA,
    Cue,
    Transcript,
    Word,
    render,
    segments,
    verbose_json,
    write_transcript,
    write_transcripts,
)

SRT_TIMING = re.compile(r"^\d{2,}:[0-5]\d:[0-5]\d,\d{3} --> \d{2,}:[0-5]\d:[0-5]\d,\d{3}$")
VTT_TIMING = re.compile(r"^\d{2,}:[0-5]\d:[0-5]\d\.\d{3} --> \d{2,}:[0-5]\d:[0-5]\d\.\d{3}$")
VOCAB = (
    "A I THE OF AND TO WAS HE IN THAT IT HIS HAD YOU WITH AS FOR HER BUT NOT SHE ALL BE THEY "
    "WERE WHICH HAVE SAID FROM THERE UPON LITTLE WITHOUT NOTHING SOMETIMES PERHAPS AFTERWARDS "
    "NEVERTHELESS UNDERSTANDING EXTRAORDINARY CIRCUMSTANCES ACKNOWLEDGEMENT"
).split()


def transcript_of(words: list[Word], duration: float | None = None, **kw) -> Transcript:
    duration = words[-1].end + 0.5 if duration is None else duration
    return Transcript(" ".join(w.word for w in words), duration, words, **kw)


def timed(texts: list[str], start: float = 0.0, length: float = 0.4, gaps=None) -> list[Word]:
    """Words of ``length`` seconds each; ``gaps[k]`` seconds before word k (default 0.05)."""
    gaps = gaps or {}
    words, t = [], start
    for k, text in enumerate(texts):
        t += gaps.get(k, 0.05) if k else 0.0
        words.append(Word(text, round(t, 3), round(t + length, 3), 0.9))
        t += length
    return words


def random_words(seed: int, n: int = 150, start: float = 0.0) -> list[Word]:
    """Speech-like words: mostly short gaps, some pauses, a few very long words."""
    rng = random.Random(seed)
    words, t = [], start + rng.uniform(0.0, 1.0)
    for _ in range(n):
        text = "X" * 50 if rng.random() < 0.02 else rng.choice(VOCAB)
        length = 0.06 * len(text) + rng.uniform(0.05, 0.2)
        words.append(Word(text, round(t, 3), round(t + length, 3), rng.uniform(0.05, 1.0)))
        t += length + rng.choice([0.0, 0.0, 0.04, 0.08, 0.12, 0.3, 0.6, 1.2, 2.5])
    return words


@pytest.fixture
def speech() -> Transcript:
    return transcript_of(random_words(7), timings={"load": 0.25, "encode": 1.5})


def ms(seconds: float) -> timedelta:
    return timedelta(milliseconds=round(seconds * 1000))


# --- the formats, read back by their parsers ---------------------------------------------


def test_srt_parses_into_the_cues(speech: Transcript) -> None:
    cues = segments(speech.words)
    text = render(speech, "srt")
    subs = list(srt.parse(text))
    assert len(subs) == len(cues) > 10
    assert [s.index for s in subs] == list(range(1, len(cues) + 1))
    assert [(s.start, s.end) for s in subs] == [(ms(c.start), ms(c.end)) for c in cues]
    assert [s.content for s in subs] == ["\n".join(c.lines) for c in cues]
    assert srt.compose(subs) == text  # the canonical layout: numbered, blank-line separated
    timings = [line for line in text.splitlines() if "-->" in line]
    assert len(timings) == len(cues) and all(SRT_TIMING.match(line) for line in timings)


def test_vtt_parses_into_the_cues(speech: Transcript) -> None:
    cues = segments(speech.words)
    text = render(speech, "vtt")
    assert text.startswith("WEBVTT\n\n")
    captions = webvtt.from_string(text)
    assert len(captions) == len(cues) > 10
    assert [(c.start_time.in_milliseconds(), c.end_time.in_milliseconds()) for c in captions] == [
        (round(c.start * 1000), round(c.end * 1000)) for c in cues
    ]
    assert [c.lines for c in captions] == [list(c.lines) for c in cues]
    assert captions.content == text
    timings = [line for line in text.splitlines() if "-->" in line]
    assert len(timings) == len(cues) and all(VTT_TIMING.match(line) for line in timings)


def test_tsv_is_whispers_table_in_milliseconds(speech: Transcript) -> None:
    cues = segments(speech.words)
    rows = list(csv.reader(io.StringIO(render(speech, "tsv")), delimiter="\t"))
    assert rows[0] == ["start", "end", "text"]
    assert rows[1:] == [
        [str(round(c.start * 1000)), str(round(c.end * 1000)), c.text] for c in cues
    ]


def test_txt_has_one_cue_per_line(speech: Transcript) -> None:
    cues = segments(speech.words)
    text = render(speech, "txt")
    assert text.endswith("\n")
    assert text.splitlines() == [c.text for c in cues]
    assert " ".join(text.splitlines()) == speech.text


def test_json_validates_and_parses_as_openai_verbose_transcription(speech: Transcript) -> None:
    cues = segments(speech.words)
    data = json.loads(render(speech, "json"))
    jsonschema.Draft202012Validator.check_schema(JSON_SCHEMA)
    jsonschema.validate(data, JSON_SCHEMA, cls=jsonschema.Draft202012Validator)
    parsed = TranscriptionVerbose.model_validate(data)
    assert parsed.language == "english" and parsed.text == speech.text
    assert parsed.duration == round(speech.duration, 3)
    assert [(s.id, s.start, s.end, s.text) for s in parsed.segments] == [
        (n, round(c.start, 3), round(c.end, 3), c.text) for n, c in enumerate(cues)
    ]
    assert [(w.word, w.start, w.end) for w in parsed.words] == [
        (w.word, round(w.start, 3), round(w.end, 3)) for w in speech.words
    ]
    assert [w["probability"] for w in data["words"]] == [w.probability for w in speech.words]
    assert data["timings"] == {"load": 0.25, "encode": 1.5}
    for segment, cue in zip(data["segments"], cues, strict=True):
        logs = [math.log(w.probability) for w in cue.words]
        assert segment["avg_logprob"] == pytest.approx(sum(logs) / len(logs), rel=1e-12)
        assert segment["avg_logprob"] < 0
        raw = cue.text.encode("utf-8")
        assert segment["compression_ratio"] == len(raw) / len(zlib.compress(raw))
        assert (segment["seek"], segment["tokens"], segment["temperature"]) == (0, [], 0.0)
        assert segment["no_speech_prob"] == 0.0


@pytest.mark.parametrize(
    "broken",
    [
        lambda d: d.pop("segments"),
        lambda d: d["words"][0].update(probability=1.5),
        lambda d: d["words"][0].update(word="TWO WORDS"),
        lambda d: d["segments"][0].update(tokens=["A"]),
        lambda d: d["segments"][0].pop("avg_logprob"),
        lambda d: d.update(task="translate"),
        lambda d: d["timings"].update(load=-1.0),
        lambda d: d.update(speaker="A"),
        lambda d: d["segments"][0].update(speaker="A"),
    ],
    ids=[
        "no-segments", "probability", "word-space", "tokens", "no-avg_logprob", "task", "timing",
        "extra-key", "extra-segment-key",
    ],
)
def test_json_schema_rejects_a_broken_object(speech: Transcript, broken) -> None:
    data = verbose_json(speech)
    broken(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, JSON_SCHEMA, cls=jsonschema.Draft202012Validator)


# --- cue rules ----------------------------------------------------------------------------


def minimal_longest_line(texts: list[str], lines: int) -> int:
    """The shortest possible longest line of ``texts`` in exactly ``lines`` lines."""
    best = math.inf
    for cuts in itertools.combinations(range(1, len(texts)), lines - 1):
        bounds = [0, *cuts, len(texts)]
        best = min(best, max(len(" ".join(texts[a:b])) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    "rules",
    [
        {},
        {"max_seconds": 3.0, "max_line_chars": 20, "max_lines": 1, "pause": 0.5},
        {"max_seconds": 12.0, "max_line_chars": 32, "max_lines": 3, "pause": 2.0},
    ],
    ids=["default", "short-one-line", "long-three-lines"],
)
def test_cues_follow_the_subtitle_rules(seed: int, rules: dict) -> None:
    max_seconds = rules.get("max_seconds", 7.0)
    max_chars = rules.get("max_line_chars", 42)
    max_lines = rules.get("max_lines", 2)
    pause = rules.get("pause", 1.0)
    t = transcript_of(random_words(seed, start=3600.0 * seed))
    cues = segments(t.words, **rules)
    assert [w for c in cues for w in c.words] == t.words  # every word once, in order
    for c in cues:
        texts = [w.word for w in c.words]
        assert " ".join(c.lines) == " ".join(texts) == c.text
        assert (c.start, c.end) == (c.words[0].start, c.words[-1].end)
        assert 1 <= len(c.lines) <= max_lines
        if len(c.words) > 1:  # a lone word may be longer than a line or max_seconds
            assert c.end - c.start <= max_seconds
            assert max(len(line) for line in c.lines) <= max_chars
            # balanced: the fewest lines that fit, with the shortest possible longest line
            assert max(len(line) for line in c.lines) == minimal_longest_line(texts, len(c.lines))
            if len(c.lines) > 1:
                assert minimal_longest_line(texts, len(c.lines) - 1) > max_chars
        gaps = [b.start - a.end for a, b in itertools.pairwise(c.words)]
        assert all(g < pause for g in gaps)  # a long pause always ends a cue
    assert any(len(c.lines) == max_lines for c in cues)
    assert any(len(c.words) == 1 and len(c.text) > max_chars for c in cues)
    for a, b in itertools.pairwise(cues):
        assert a.start <= a.end <= b.start <= b.end
    assert 0.0 <= cues[0].start and cues[-1].end <= t.duration


def test_a_cue_ends_at_the_longest_pause_it_can_reach() -> None:
    # 20 four-letter words of 0.4 s, 0.05 s apart: 15 fit in 7 s (two lines hold 16); the
    # longest gap (0.3 s) lies before word 12, so the cue ends there (12 + 8, not 14 + 6).
    words = timed(["WORD"] * 20, gaps={12: 0.3, 4: 0.25})
    cues = segments(words)
    assert [len(c.words) for c in cues] == [12, 8]
    assert cues[0].end == words[11].end and cues[1].start == words[12].start
    # without the pause it fills the cue (ties: the later break)
    assert [len(c.words) for c in segments(timed(["WORD"] * 20))] == [15, 5]
    # a longer gap early in the cue does not make a fragment of it: at least half stays
    early = timed(["WORD"] * 20, gaps={3: 0.3})
    assert [len(c.words) for c in segments(early)] == [15, 5]


def test_a_long_pause_always_splits() -> None:
    texts = ["GOOD", "MORNING", "DEAR", "FRIENDS"]
    split = ["GOOD MORNING", "DEAR FRIENDS"]
    assert [c.text for c in segments(timed(texts, gaps={2: 1.0}))] == split
    just_under = timed(texts, gaps={2: 0.999})
    assert [c.text for c in segments(just_under)] == [" ".join(texts)]
    assert [c.text for c in segments(just_under, pause=0.5)] == split
    # a pause of 25 frames of 40 ms is a second, though the float difference falls short
    noisy = [Word("GOOD", 0.0, 4 * 0.04, 1), Word("MORNING", 29 * 0.04, 40 * 0.04, 1)]
    assert noisy[1].start - noisy[0].end < 1.0
    assert [c.text for c in segments(noisy)] == ["GOOD", "MORNING"]


def test_lines_break_balanced_at_word_boundaries() -> None:
    texts = "ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE".split()
    (cue,) = segments(timed(texts, length=0.2))
    # 60 characters: two lines, the longer as short as possible (not 42 + 17)
    assert cue.lines == ("ONE TWO THREE FOUR FIVE SIX SEVEN", "EIGHT NINE TEN ELEVEN TWELVE")
    (short,) = segments(timed(["SHORT", "LINE"]))
    assert short.lines == ("SHORT LINE",)
    (tie,) = segments(timed(["AAA", "BBB", "CCC"]), max_line_chars=8)
    assert tie.lines == ("AAA", "BBB CCC")


def test_cue_rules_reject_bad_settings() -> None:
    words = timed(["A"])
    for bad in ({"max_seconds": 0}, {"pause": -1.0}, {"max_lines": 0}, {"max_line_chars": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            segments(words, **bad)


# --- hour-long files, unicode, empty ------------------------------------------------------


def test_hour_long_timestamps() -> None:
    words = [
        Word("ONE", 3723.456, 3724.0, 0.5),
        Word("TWO", 3724.1, 3725.9996, 0.5),  # rounds up to the next second
        Word("HUNDRED", 360_000.0, 360_061.5, 0.5),  # 100 hours: a word of its own
    ]
    t = transcript_of(words)
    text = render(t, "srt")
    assert "01:02:03,456 --> 01:02:06,000\nONE TWO\n" in text
    assert "100:00:00,000 --> 100:01:01,500\nHUNDRED\n" in text
    assert [(s.start, s.end) for s in srt.parse(text)] == [
        (timedelta(seconds=3723.456), timedelta(seconds=3726)),
        (timedelta(hours=100), timedelta(hours=100, seconds=61.5)),
    ]
    vtt = render(t, "vtt")
    assert "\n01:02:03.456 --> 01:02:06.000\nONE TWO\n" in vtt
    assert [c.start_time.in_milliseconds() for c in webvtt.from_string(vtt)] == [3723456, 360000000]
    assert render(t, "tsv").splitlines()[1:] == [
        "3723456\t3726000\tONE TWO",
        "360000000\t360061500\tHUNDRED",
    ]
    assert [s["start"] for s in verbose_json(t)["segments"]] == [3723.456, 360000.0]


def test_unicode_words_round_trip_through_every_format(tmp_path: Path) -> None:
    texts = ["ÇA", "NAÏVE", "日本語", "Ω", "R&D<3>", *["ÉÉÉÉÉÉÉÉÉÉ"] * 3, "ÜBER"]
    t = transcript_of(timed(texts, length=0.3))
    paths = write_transcripts(t, "all", tmp_path, "ünïcode")
    assert [p.name for p in paths] == [f"ünïcode.{fmt}" for fmt in FORMATS]
    read = {p.suffix[1:]: p.read_bytes().decode("utf-8") for p in paths}
    (cue,) = segments(t.words)
    assert cue.lines == ("ÇA NAÏVE 日本語 Ω R&D<3> ÉÉÉÉÉÉÉÉÉÉ", "ÉÉÉÉÉÉÉÉÉÉ ÉÉÉÉÉÉÉÉÉÉ ÜBER")
    # lines count characters, not bytes: 37 characters (68 bytes of UTF-8) are one line
    (one,) = segments(timed(["ÉÉÉÉÉÉÉÉÉÉ"] * 3 + ["ÜBER"]))
    assert [(len(line), len(line.encode())) for line in one.lines] == [(37, 68)]
    assert read["txt"] == t.text + "\n"
    assert [s.content for s in srt.parse(read["srt"])] == ["\n".join(cue.lines)]
    (caption,) = webvtt.from_string(read["vtt"])
    assert "R&amp;D&lt;3&gt;" in read["vtt"]  # cue text escapes & < > as WebVTT requires
    assert [html.unescape(line) for line in caption.lines] == list(cue.lines)
    assert read["tsv"].splitlines()[1].split("\t")[2] == t.text
    data = json.loads(read["json"])
    assert "日本語" in read["json"] and data["text"] == t.text
    assert TranscriptionVerbose.model_validate(data).words[2].word == "日本語"
    raw = t.text.encode("utf-8")
    assert data["segments"][0]["compression_ratio"] == len(raw) / len(zlib.compress(raw))


def test_empty_transcript_is_valid_in_every_format() -> None:
    t = Transcript("", 2.5, [])
    assert segments(t.words) == []
    assert render(t, "txt") == ""
    assert render(t, "srt") == "" and list(srt.parse(render(t, "srt"))) == []
    assert render(t, "vtt") == "WEBVTT\n" and len(webvtt.from_string(render(t, "vtt"))) == 0
    assert render(t, "tsv") == "start\tend\ttext\n"
    data = json.loads(render(t, "json"))
    jsonschema.validate(data, JSON_SCHEMA, cls=jsonschema.Draft202012Validator)
    parsed = TranscriptionVerbose.model_validate(data)
    assert (parsed.text, parsed.duration, parsed.segments, parsed.words) == ("", 2.5, [], [])


def test_text_without_word_times_is_kept_in_txt_and_json() -> None:
    t = Transcript("NO TIMES HERE", 1.0, [])
    assert render(t, "txt") == "NO TIMES HERE\n"
    assert json.loads(render(t, "json"))["text"] == "NO TIMES HERE"
    assert render(t, "srt") == ""


# --- writing files and bad input ----------------------------------------------------------


def test_write_transcripts_writes_each_format_atomically(
    speech: Transcript, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "folder"
    paths = write_transcripts(speech, "all", out, "talk")
    assert paths == [out / f"talk.{fmt}" for fmt in FORMATS]
    assert [p.read_text(encoding="utf-8") for p in paths] == [render(speech, f) for f in FORMATS]
    short = transcript_of(speech.words[:3])
    assert write_transcript(short, "srt", out, "talk") == out / "talk.srt"
    assert (out / "talk.srt").read_text(encoding="utf-8") == render(short, "srt")
    assert write_transcripts(short, "vtt", out, "talk") == [out / "talk.vtt"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"talk.{f}" for f in FORMATS)
    assert not any(TMP_MARK in p.name for p in out.iterdir())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t, d: write_transcripts(t, "docx", d, "x"), "'docx'.*json, srt, vtt, tsv or all"),
        (lambda t, d: write_transcript(t, "all", d, "x"), "'all' is for write_transcripts"),
        (lambda t, d: render(t, "SRT"), "unknown output format 'SRT'"),
        (lambda t, d: write_transcript(t, "txt", d, "sub/x"), "without a folder.*'sub/x'"),
        (lambda t, d: write_transcript(t, "txt", d, ".."), "without a folder.*'..'"),
    ],
    ids=["format", "all", "case", "stem-folder", "stem-dots"],
)
def test_bad_output_requests_are_named_and_write_nothing(
    speech: Transcript, tmp_path: Path, call, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(speech, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Word("", 0.0, 1.0, 0.5), "non-empty string without spaces: ''"),
        (lambda: Word("TWO WORDS", 0.0, 1.0, 0.5), "'TWO WORDS'"),
        (lambda: Word("A", 2.0, 1.0, 0.5), "'A' ends at 1.0 s, before its start"),
        (lambda: Word("A", -0.1, 1.0, 0.5), "'A' start must be .* >= 0, got -0.1"),
        (lambda: Word("A", 0.0, math.nan, 0.5), "'A' end must be a finite .*nan"),
        (lambda: Word("A", 0.0, 1.0, 1.5), "'A' probability must be in 0..1, got 1.5"),
        (
            lambda: Transcript("A B", 5.0, [Word("A", 0, 2, 1), Word("B", 1.5, 3, 1)], "x.wav"),
            "word 1 \\('B'\\) in x.wav starts at 1.5 s, before word 0 \\('A'\\) ends at 2",
        ),
        (
            lambda: Transcript("A", 1.0, [Word("A", 0.5, 1.04, 1)], "x.wav"),
            "word 0 \\('A'\\) in x.wav ends at 1.04 s, after the end of the audio \\(1.0 s\\)",
        ),
        (lambda: Transcript("A  B", 3, [Word("A", 0, 1, 1), Word("B", 1, 2, 1)]), "'A  B'"),
        (lambda: Transcript("", 1.0, [], timings={"load": math.inf}), "timing 'load'"),
        (lambda: Transcript("", -1.0, []), "duration must be"),
    ],
    ids=["empty", "space", "end-before-start", "negative", "nan", "probability", "overlap",
         "past-the-end", "text", "timing", "duration"],
)
def test_bad_words_and_transcripts_are_named(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_cues_can_be_shared_between_formats(speech: Transcript) -> None:
    one_line = segments(speech.words, max_lines=1, max_line_chars=30)
    assert all(len(c.lines) == 1 for c in one_line)
    assert render(speech, "txt", one_line).splitlines() == [c.text for c in one_line]
    assert isinstance(one_line[0], Cue)
    assert len(verbose_json(speech, one_line)["segments"]) == len(one_line) > len(
        segments(speech.words)
    )
