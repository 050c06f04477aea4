"""Build the synthetic demo corpus in LibriSpeech layout, deterministically and atomically.

A speaker is one eSpeak NG voice (language voice + variant) with its own base speaking rate,
pitch and pitch range; every utterance jitters these a little. dev-clean, test-clean and
test-other are spoken by variants that train-clean-100 never uses (and test voices are not in
dev-clean either); test-other also speaks faster and adds seeded noise at 15-20 dB SNR. The
adapt splits (adapt-train, adapt-dev, adapt-test) are spoken by the test-other voices, with
their settings, as speakers of their own, for fine-tuning to those voices. Every utterance has
word times (``<spk>-<chapter>.words.tsv``, see ``word_times``); no sentence occurs twice in the
corpus. Every file is checked against the committed ``checksums_<preset>.tsv``: sha256 of the
decoded int16 samples for audio (independent of the FLAC encoder's bytes), of the bytes for text.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mamba_asr.atomic import atomic_open
from mamba_asr.demo_corpus import word_times
from mamba_asr.demo_corpus.sentences import SentenceGenerator
from mamba_asr.workers import exit_with_parent

SPEC_VERSION = 3  # 3: word times and the adapt splits
SEED = 20240611
SAMPLE_RATE = 16000
LEAD_S, TRAIL_S = 0.12, 0.15  # silence kept (or padded) around the speech
STAMP = "demo_corpus.json"
HEADER = "; Mamba-ASR synthetic demo corpus: eSpeak NG voices (NAME = voice+variant)"
ADAPT_SPLITS = ("adapt-train", "adapt-dev", "adapt-test")
SPLITS = ("train-clean-100", "dev-clean", "test-clean", "test-other", *ADAPT_SPLITS)
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Voice:
    """A speaker's voice: eSpeak language voice and variant, sex, base rate/pitch/range."""

    language: str
    variant: str
    sex: str
    rate: int  # words per minute
    pitch: int  # 0-100
    pitch_range: int  # 0-100

    @property
    def name(self) -> str:
        """The eSpeak voice name, e.g. "en-us+m3"."""
        return f"{self.language}+{self.variant}"


def _voices(*rows: tuple[str, str, int, int, int]) -> list[Voice]:
    return [
        Voice(lang, var, "F" if var[0] == "f" else "M", r, p, pr) for lang, var, r, p, pr in rows
    ]


# Variants per split are disjoint: m1-m3, m5, m6, f1, f2, f4 train; m4, f3 dev; m7, m8, f5
# test-clean; the named variants (two of them Klatt-based) test-other, which also speaks faster.
VOICES: dict[str, list[Voice]] = {
    "train-clean-100": _voices(
        ("en-us", "m1", 175, 45, 50),
        ("en", "m1", 185, 50, 55),
        ("en-us", "m2", 180, 40, 45),
        ("en-gb-x-rp", "m2", 170, 55, 50),
        ("en", "m3", 190, 45, 60),
        ("en-us-nyc", "m3", 175, 50, 45),
        ("en-us", "m5", 170, 50, 55),
        ("en-gb-x-rp", "m5", 185, 40, 50),
        ("en-us-nyc", "m6", 180, 45, 50),
        ("en", "m6", 170, 55, 60),
        ("en-us", "f1", 180, 50, 55),
        ("en-gb-x-rp", "f1", 170, 55, 50),
        ("en", "f2", 185, 45, 45),
        ("en-us-nyc", "f2", 175, 50, 55),
        ("en-us", "f4", 170, 55, 50),
        ("en", "f4", 190, 45, 60),
    ),
    "dev-clean": _voices(
        ("en-us", "m4", 180, 50, 50),
        ("en-gb-x-rp", "f3", 175, 50, 55),
        ("en-us-nyc", "m4", 170, 45, 45),
        ("en", "f3", 185, 55, 50),
    ),
    "test-clean": _voices(
        ("en-us", "m7", 175, 50, 50),
        ("en", "m8", 180, 45, 55),
        ("en-gb-x-rp", "f5", 170, 50, 50),
        ("en-us-nyc", "f5", 185, 55, 45),
    ),
    "test-other": [
        Voice("en-us", "edward", "M", 205, 45, 55),
        Voice("en", "david", "M", 210, 50, 50),
        Voice("en-us-nyc", "linda", "F", 200, 55, 60),
        Voice("en-gb-x-rp", "belinda", "F", 205, 50, 45),
    ],
}
VOICES.update({split: VOICES["test-other"] for split in ADAPT_SPLITS})
NOISE_SNR_DB = {split: (15.0, 20.0) for split in ("test-other", *ADAPT_SPLITS)}


@dataclass(frozen=True)
class Preset:
    """Speakers per split, utterances per speaker, most chapters a speaker reads, longest
    sentence and peak level range (tiny: short and quiet, to keep its committed FLACs small;
    one speaker per adapt split, whose noise compresses badly)."""

    name: str
    speakers: dict[str, int]
    utterances: dict[str, int]
    max_chapters: dict[str, int]
    max_words: int = 9
    gain: tuple[float, float] = (0.3, 0.8)
    rate_scale: float = 1.0


PRESETS = {
    "demo": Preset(
        "demo",
        speakers={s: len(VOICES[s]) for s in SPLITS},
        utterances={
            "train-clean-100": 190,
            "dev-clean": 65,
            "test-clean": 65,
            "test-other": 65,
            "adapt-train": 75,
            "adapt-dev": 15,
            "adapt-test": 25,
        },
        max_chapters={
            "train-clean-100": 3,
            "dev-clean": 2,
            "test-clean": 2,
            "test-other": 2,
            "adapt-train": 3,
            "adapt-dev": 1,
            "adapt-test": 2,
        },
    ),
    "tiny": Preset(
        "tiny",
        speakers={s: 1 if s in ADAPT_SPLITS else 2 for s in SPLITS},
        utterances={s: 3 for s in SPLITS} | {"adapt-train": 2, "adapt-dev": 1, "adapt-test": 1},
        max_chapters={s: 1 for s in SPLITS},
        max_words=3,
        gain=(0.02, 0.04),
        rate_scale=1.25,
    ),
}


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker of one split."""

    id: int
    split: str
    voice: Voice
    chapters: tuple[int, ...]


@dataclass(frozen=True)
class Job:
    """One utterance to synthesise; ``rel_path`` is relative to ``LibriSpeech/``."""

    rel_path: str
    text: str
    voice: str
    rate: int
    pitch: int
    pitch_range: int
    gain: float  # peak level, fraction of full scale
    snr_db: float | None
    noise_seed: int


def plan(preset: Preset) -> tuple[list[Speaker], list[Job]]:
    """The speakers and utterances of a preset: a pure function of the preset and SEED.

    Sentences are drawn without repetition over the whole corpus, so no sentence of a test
    split occurs in train-clean-100 (or anywhere else). The adapt splits come last: adding
    them left the speakers, sentences and settings of the other splits as they were.
    """
    total = sum(preset.speakers[s] * preset.utterances[s] for s in SPLITS)
    sentences = SentenceGenerator(SEED).unique_sentences(total, max_words=preset.max_words)
    rng = random.Random(f"{SEED}-plan")
    speakers: list[Speaker] = []
    jobs: list[Job] = []
    spk_id, chapter_id = 100, 1000
    for split in SPLITS:
        snr = NOISE_SNR_DB.get(split)
        for voice in VOICES[split][: preset.speakers[split]]:
            spk_id += rng.randint(3, 60)
            n_chapters = rng.randint(1, preset.max_chapters[split])
            chapters = []
            for _ in range(n_chapters):
                chapter_id += rng.randint(50, 4000)
                chapters.append(chapter_id)
            speakers.append(Speaker(spk_id, split, voice, tuple(chapters)))
            n_utts = preset.utterances[split]
            for k, chapter in enumerate(chapters):
                count = n_utts // n_chapters + (k < n_utts % n_chapters)
                for utt in range(count):
                    utt_id = f"{spk_id}-{chapter}-{utt:04d}"
                    jobs.append(
                        Job(
                            rel_path=f"{split}/{spk_id}/{chapter}/{utt_id}.flac",
                            text=next(sentences),
                            voice=voice.name,
                            rate=round(voice.rate * preset.rate_scale * rng.uniform(0.93, 1.07)),
                            pitch=voice.pitch + rng.randint(-5, 5),
                            pitch_range=voice.pitch_range + rng.randint(-8, 8),
                            gain=round(rng.uniform(*preset.gain), 3),
                            snr_db=round(rng.uniform(*snr), 2) if snr else None,
                            noise_seed=rng.getrandbits(63),
                        )
                    )
    return speakers, jobs


def spec_hash(preset: Preset) -> str:
    """Hash of everything that determines the corpus except the engine: version + plan."""
    speakers, jobs = plan(preset)
    spec = {
        "version": SPEC_VERSION,
        "render": [SAMPLE_RATE, LEAD_S, TRAIL_S],
        "word_times": [word_times.ENVELOPE_S, word_times.SILENCE_DB, word_times.LEVEL_PERCENTILE],
        "speakers": [asdict(s) for s in speakers],
        "jobs": [asdict(j) for j in jobs],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- synthesis

_ENGINE = None


def _init_worker(parent_pid: int | None = None) -> None:
    """Start this process's eSpeak engine; import what the forked children will need."""
    global _ENGINE
    import scipy.signal  # noqa: F401  (imported once here, not in every forked child)
    import soundfile  # noqa: F401

    from mamba_asr.demo_corpus.espeak import ESpeak

    if parent_pid is not None:
        exit_with_parent(parent_pid)
    if _ENGINE is None:  # this process's engine never speaks itself: it can be reused
        _ENGINE = ESpeak()


def _speech_text(text: str) -> str:
    """What the engine reads: lowercase (no spelled-out capitals) with final punctuation."""
    question = text.split(" ", 1)[0] in {"WHERE", "WHY", "WHEN", "HOW"}
    return text.lower() + ("?" if question else ".")


class Rendered(NamedTuple):
    """One synthesised utterance as its file holds it."""

    samples: np.ndarray  # (samples,) int16 at SAMPLE_RATE
    words: list[word_times.WordTime]  # (word, start, end) in seconds of the file, 3 decimals


def render(job: Job) -> Rendered:
    """Synthesise one utterance: (samples,) int16 at 16 kHz and its word times.

    The speech (from 20 ms before the first to 20 ms after the last sample above 1 % of the
    peak, with 10 ms fades) is framed by exactly LEAD_S and TRAIL_S of digital silence and
    scaled to the job's peak level; test-other and the adapt splits then get their seeded
    white noise. Word times are measured on the clean speech at 16 kHz (``word_times``) and
    moved by the trimming and the lead.
    """
    from scipy.signal import resample_poly

    speech = _ENGINE.synthesize(
        _speech_text(job.text), job.voice, job.rate, job.pitch, job.pitch_range, job.noise_seed
    )
    starts_ms = word_times.word_starts_ms(job.text, speech, _ENGINE.phonemes)
    g = math.gcd(SAMPLE_RATE, _ENGINE.sample_rate)  # 22050 -> 16000 Hz: 320/441
    y = resample_poly(
        speech.samples.astype(np.float64) / 32768.0, SAMPLE_RATE // g, _ENGINE.sample_rate // g
    )
    level = np.abs(y)
    loud = np.flatnonzero(level > 0.01 * level.max())
    margin, fade = round(0.02 * SAMPLE_RATE), round(0.01 * SAMPLE_RATE)
    first = max(0, loud[0] - margin)
    starts = [ms * SAMPLE_RATE // 1000 for ms in starts_ms]
    bounds = word_times.word_bounds(y, starts, loud[0], loud[-1] + 1, SAMPLE_RATE)
    shift = round(LEAD_S * SAMPLE_RATE) - first  # sample of y -> sample of the file
    words = [
        (word, round((a + shift) / SAMPLE_RATE, 3), round((b + shift) / SAMPLE_RATE, 3))
        for word, (a, b) in zip(job.text.split(" "), bounds, strict=True)
    ]
    kept = y[first : loud[-1] + 1 + margin].copy()
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    kept[:fade] *= ramp
    kept[-fade:] *= ramp[::-1]
    y = np.concatenate(
        [np.zeros(round(LEAD_S * SAMPLE_RATE)), kept, np.zeros(round(TRAIL_S * SAMPLE_RATE))]
    )
    y *= job.gain / np.abs(y).max()
    if job.snr_db is not None:
        noise = np.random.Generator(np.random.PCG64(job.noise_seed)).standard_normal(len(y))
        noise *= np.sqrt(np.mean(y**2) / 10 ** (job.snr_db / 10) / np.mean(noise**2))
        y += noise
        y *= min(1.0, 0.95 / np.abs(y).max())
    return Rendered(np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16), words)


def pcm_sha256(samples: np.ndarray) -> str:
    """Checksum of int16 samples (as little-endian bytes)."""
    return hashlib.sha256(np.ascontiguousarray(samples, dtype="<i2").tobytes()).hexdigest()


class Written(NamedTuple):
    """What synthesising one job wrote: its file, checksum, length and word times."""

    rel_path: str
    sha256: str
    samples: int
    words: list[word_times.WordTime]


def _synthesise_to(folder: Path, job: Job) -> Written:
    import soundfile as sf

    samples, words = render(job)
    path = folder / job.rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return Written(job.rel_path, pcm_sha256(samples), len(samples), words)


def _synthesise_isolated(folder: Path, job: Job) -> Written:
    """Synthesise ``job`` in a forked child of this process, whose engine has never spoken.

    eSpeak NG carries state from one utterance to the next, so the same request sounds
    slightly different depending on what was said before. Forking from a freshly initialised
    engine gives every utterance the same starting state, whatever the order of the jobs, the
    number of workers or the machine.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            os.close(read_fd)
            payload = json.dumps(_synthesise_to(folder, job))
            code = 0
        except BaseException as exc:  # report any failure to the parent
            payload = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            with contextlib.suppress(BaseException):
                os.write(write_fd, payload.encode())
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(payload) if payload else {"error": f"child exited with status {status}"}
    if isinstance(result, dict):
        raise RuntimeError(f"synthesis of {job.rel_path} failed: {result['error']}")
    rel, digest, n, words = result
    return Written(rel, digest, n, [(w, a, b) for w, a, b in words])


class _Writer:
    """Picklable pool task: synthesise a job into ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, job: Job) -> Written:
        return _synthesise_isolated(self.folder, job)


def synthesise_all(folder: Path, jobs: list[Job], workers: int) -> list[Written]:
    """Write every job's FLAC under ``folder``; what each wrote, in job order."""
    if workers <= 1 or len(jobs) < 2:
        _init_worker()
        return [_synthesise_isolated(folder, job) for job in jobs]
    ctx = get_context("spawn")  # each worker starts its own engine, no inherited C state
    with ctx.Pool(workers, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        return list(pool.imap(_Writer(folder), jobs, chunksize=8))


# --------------------------------------------------------------------------- text files


def _chapter_file(rel_path: str, suffix: str) -> tuple[str, str]:
    """The chapter file ``<folder>/<spk>-<chapter><suffix>`` of an utterance's FLAC path, and
    the utterance's id."""
    folder, name = rel_path.rsplit("/", 1)
    utt_id = name.removesuffix(".flac")
    return f"{folder}/{utt_id.rsplit('-', 1)[0]}{suffix}", utt_id


def transcripts(jobs: list[Job]) -> dict[str, str]:
    """``{rel_path of <spk>-<chapter>.trans.txt: content}``, lines in utterance order."""
    chapters: dict[str, list[str]] = {}
    for job in jobs:
        path, utt_id = _chapter_file(job.rel_path, word_times.TRANS_SUFFIX)
        chapters.setdefault(path, []).append(f"{utt_id} {job.text}\n")
    return {path: "".join(lines) for path, lines in chapters.items()}


def word_time_files(written: list[Written]) -> dict[str, str]:
    """``{rel_path of <spk>-<chapter>.words.tsv: content}``, utterances in job order."""
    chapters: dict[str, list[tuple[str, list[word_times.WordTime]]]] = {}
    for w in written:
        path, utt_id = _chapter_file(w.rel_path, word_times.WORDS_SUFFIX)
        chapters.setdefault(path, []).append((utt_id, w.words))
    return {path: word_times.format_word_times(utts) for path, utts in chapters.items()}


def speakers_txt(speakers: list[Speaker], minutes: dict[int, float]) -> str:
    """SPEAKERS.TXT in LibriSpeech's format; NAME is the eSpeak voice+variant."""
    lines = [
        HEADER + "\n",
        ";\n",
        ";ID      |SEX| SUBSET           |MINUTES| NAME\n",
    ]
    for s in speakers:
        row = f"{s.id:<9}| {s.voice.sex} | {s.split:<17}| {minutes[s.id]:5.2f} | {s.voice.name}"
        lines.append(row + "\n")
    return "".join(lines)


def read_speakers(librispeech: str | os.PathLike) -> list[dict[str, str]]:
    """Parse a SPEAKERS.TXT: [{"id", "sex", "subset", "minutes", "name"}]."""
    rows = []
    for line in (Path(librispeech) / "SPEAKERS.TXT").read_text().splitlines():
        if line.startswith(";") or not line.strip():
            continue
        spk, sex, subset, minutes, name = (field.strip() for field in line.split("|", 4))
        rows.append({"id": spk, "sex": sex, "subset": subset, "minutes": minutes, "name": name})
    return rows


# --------------------------------------------------------------------------- checksums


def checksum_path(preset: str) -> Path:
    """The committed checksum record of a preset."""
    return HERE / f"checksums_{preset}.tsv"


Record = dict[str, tuple[str, str]]  # rel_path -> (sha256, samples or "-")


def read_record(path: Path) -> Record:
    """Parse a checksum record (``path<TAB>sha256<TAB>samples``, ``#`` comments)."""
    entries: Record = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            rel, digest, samples = line.split("\t")
            entries[rel] = (digest, samples)
    return entries


def format_record(entries: Record) -> str:
    """The text of a checksum record, sorted by path."""
    head = "# path\tsha256 (FLAC: of the int16 samples; text: of the bytes)\tsamples\n"
    return head + "".join(f"{rel}\t{d}\t{n}\n" for rel, (d, n) in sorted(entries.items()))


def compare(found: Record, expected: Record) -> list[str]:
    """Human-readable differences between two records (empty when equal)."""
    problems = [f"{rel}: missing" for rel in sorted(expected.keys() - found.keys())]
    problems += [f"{rel}: not in the record" for rel in sorted(found.keys() - expected.keys())]
    for rel in sorted(found.keys() & expected.keys()):
        if found[rel] != expected[rel]:
            (got, got_n), (want, want_n) = found[rel], expected[rel]
            problems.append(
                f"{rel}: sha256 {got[:12]}… ({got_n} samples), expected {want[:12]}… "
                f"({want_n} samples)"
            )
    return problems


def hash_tree(librispeech: str | os.PathLike) -> Record:
    """Re-hash the FLAC, trans.txt, words.tsv and SPEAKERS.TXT files of a LibriSpeech folder."""
    import soundfile as sf

    root = Path(librispeech)
    found: Record = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".flac":
            samples, _ = sf.read(path, dtype="int16")
            found[rel] = (pcm_sha256(samples), str(len(samples)))
        elif path.name.endswith((word_times.TRANS_SUFFIX, word_times.WORDS_SUFFIX)) or (
            rel == "SPEAKERS.TXT"
        ):
            found[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), "-")
    return found


class CorpusMismatch(RuntimeError):
    """The synthesised corpus differs from the committed checksums."""


# --------------------------------------------------------------------------- build


def read_stamp(out: str | os.PathLike) -> dict | None:
    """The stamp of a finished build in ``out``, or None."""
    with contextlib.suppress(OSError, json.JSONDecodeError):
        stamp = json.loads((Path(out) / STAMP).read_text())
        return stamp if isinstance(stamp, dict) else None
    return None


def _fingerprint(preset: str) -> str:
    """Hash of the preset's spec and of its committed checksum record."""
    record = checksum_path(preset)
    record_hash = hashlib.sha256(record.read_bytes()).hexdigest() if record.is_file() else "none"
    return hashlib.sha256(f"{spec_hash(PRESETS[preset])}:{record_hash}".encode()).hexdigest()


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Serialise builds into the same ``out`` (concurrent test sessions, make -j)."""
    fd = os.open(out, os.O_RDONLY)  # lock the folder itself: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _ours(librispeech: Path) -> bool:
    """Whether an existing LibriSpeech folder was made by this tool (safe to replace)."""
    if (librispeech.parent / STAMP).is_file() or not any(librispeech.iterdir()):
        return True
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(librispeech / "SPEAKERS.TXT", encoding="utf-8") as f:
            return f.readline().startswith(HEADER.split(":", 1)[0])
    return False


def build(
    out: str | os.PathLike,
    preset: str = "demo",
    workers: int = 2,
    force: bool = False,
    write_checksums: bool = False,
    stamp: bool = True,
) -> dict:
    """Synthesise ``<out>/LibriSpeech`` unless the same build is already there.

    The corpus is built in a hidden sibling folder, verified against
    ``checksums_<preset>.tsv`` (or, with ``write_checksums``, recorded there), and only then
    renamed to ``LibriSpeech``; the stamp ``<out>/demo_corpus.json`` is written last.
    Returns the stamp's content, with ``already_present`` when nothing had to be done.
    Raises CorpusMismatch, leaving no LibriSpeech folder, when the audio differs from the record.
    """
    out = Path(out)
    spec = PRESETS[preset]
    target = out / "LibriSpeech"
    fingerprint = _fingerprint(preset)

    def current() -> dict | None:
        existing = read_stamp(out)
        if (
            not force
            and not write_checksums
            and existing is not None
            and existing.get("preset") == preset
            and existing.get("fingerprint") == fingerprint
            and target.is_dir()
        ):
            return {**existing, "already_present": True}
        return None

    if (done := current()) is not None:
        return done
    if not write_checksums and not checksum_path(preset).is_file():
        raise FileNotFoundError(f"no checksum record {checksum_path(preset)} for {preset!r}")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if (done := current()) is not None:  # another process finished it while we waited
            return done
        if target.exists() and not _ours(target):
            raise FileExistsError(
                f"{target} exists and was not made by this tool; choose another --out"
            )
        (out / STAMP).unlink(missing_ok=True)
        for stale in out.glob(".LibriSpeech.*"):  # left by killed builds (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # an outdated corpus: nothing named LibriSpeech while we build
            old = out / f".LibriSpeech.old-{os.getpid()}"
            os.replace(target, old)
            shutil.rmtree(old)
        building = out / f".LibriSpeech.partial-{os.getpid()}"
        start = time.perf_counter()
        try:
            speakers, jobs = plan(spec)
            results = synthesise_all(building, jobs, workers)
            found: Record = {w.rel_path: (w.sha256, str(w.samples)) for w in results}
            samples = {w.rel_path: w.samples for w in results}
            texts = transcripts(jobs) | word_time_files(results)
            minutes = {s.id: 0.0 for s in speakers}
            for rel, n in samples.items():
                minutes[int(rel.split("/")[1])] += n / SAMPLE_RATE / 60
            texts["SPEAKERS.TXT"] = speakers_txt(speakers, minutes)
            for rel, text in texts.items():
                (building / rel).write_text(text, encoding="utf-8")
                found[rel] = (hashlib.sha256(text.encode()).hexdigest(), "-")
            if write_checksums:
                with atomic_open(checksum_path(preset), "w") as f:
                    f.write(format_record(found))
                fingerprint = _fingerprint(preset)
            else:
                problems = compare(found, read_record(checksum_path(preset)))
                if problems:
                    raise CorpusMismatch(
                        f"{len(problems)} file(s) of the synthesised corpus differ from "
                        f"{checksum_path(preset)} (is espeakng-loader the pinned version? "
                        "after a deliberate change of the corpus, maintainers rerun with "
                        "--write-checksums):\n  " + "\n  ".join(problems[:20])
                    )
            os.replace(building, target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        info = {
            "preset": preset,
            "spec_version": SPEC_VERSION,
            "fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - start, 1),
            "workers": workers,
            "utterances": len(jobs),
            "hours": round(sum(samples.values()) / SAMPLE_RATE / 3600, 3),
            "vocabulary": len({w for job in jobs for w in job.text.split()}),
            "splits": split_stats(speakers, jobs, samples),
        }
        if stamp:
            with atomic_open(out / STAMP, "w") as f:
                json.dump(info, f, indent=1)
                f.write("\n")
    return info


def split_stats(speakers: list[Speaker], jobs: list[Job], samples: dict[str, int]) -> dict:
    """Utterances, hours, speakers and voices of each split."""
    stats = {}
    for split in SPLITS:
        rels = [j.rel_path for j in jobs if j.rel_path.startswith(split + "/")]
        stats[split] = {
            "utterances": len(rels),
            "hours": round(sum(samples[r] for r in rels) / SAMPLE_RATE / 3600, 3),
            "speakers": sum(s.split == split for s in speakers),
            "voices": [s.voice.name for s in speakers if s.split == split],
        }
    return stats


def verify(out: str | os.PathLike, preset: str | None = None) -> list[str]:
    """Re-hash ``<out>/LibriSpeech`` against the record of ``preset`` (default: the
    stamp's); returns the problems, empty when every file matches."""
    stamp = read_stamp(out) or {}
    if preset is None:
        preset = stamp.get("preset", "demo")
    root = Path(out) / "LibriSpeech"
    if not root.is_dir():
        return [f"{root}: no such folder"]
    if stamp.get("spec_version", SPEC_VERSION) != SPEC_VERSION:
        return [
            f"{root} was built by demo-corpus version {stamp['spec_version']}; this code makes "
            f"version {SPEC_VERSION} (with word times and the adapt splits): rebuild it with "
            f"python -m mamba_asr.demo_corpus --out {out}"
        ]
    return compare(hash_tree(root), read_record(checksum_path(preset)))
