#!/usr/bin/env python3
"""Benchmark streaming: cost per chunk over long streams, latency, and WER of streaming models.

Usage:
    python bench/bench_stream.py cost                        # 10 s, 1 min, 10 min streams
    python bench/bench_stream.py cost --minutes 1 --configs conmamba_streaming_demo
    python bench/bench_stream.py latency --models streaming=results/demo/demo_CTC_streaming/3402 \\
        conformer=results/demo/demo_CTC_conformer_streaming/3402
    python bench/bench_stream.py wer --models streaming=... bidirectional=... conformer=...

``cost``: a stream of demo test-clean speech (utterances end to end, tiled to ``--minutes``) fed
in 160-ms chunks to random-weight models of each configuration (``--configs``, hparams/CTC
names, ``name:key=value,...`` with overrides); the mean compute per chunk in the 8 s before
10 s, 1 min and 10 min of audio, its real-time factor (compute / 160 ms), and the last mark's
cost over the first's (flat: ~1.00).
One process, one thread (``--threads``), the models taking turns chunk by chunk so that the
machine's load affects them alike. Compute = ``Stream.feed``: features, front-end, encoder,
CTC head, greedy decoding.
``latency``: every demo test-clean utterance streamed in 160-ms chunks through each trained
model (a run or export folder); algorithmic latency (chunk + the model's look-ahead) and the
delay from each word's true end (the corpus' word times) to the end of the chunk whose feed
made it final (audio time; and plus that feed's compute, the wall-clock emission of a live
stream). Words are paired with the reference by edit distance; only exact matches count.
``wer``: WER on demo test-clean and test-other, offline (``Transcriber.transcribe``) for every
model and streamed (160-ms chunks, the final transcript) for those that stream.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import mamba_asr  # noqa: E402,F401  (drops SpeechBrain's torchvision notice)

# isort: split
import torch  # noqa: E402
from speechbrain.utils.edit_distance import EDIT_SYMBOLS, alignment, op_table  # noqa: E402
from speechbrain.utils.metric_stats import ErrorRateStats  # noqa: E402

from mamba_asr import audio_io  # noqa: E402
from mamba_asr.export import export_untrained  # noqa: E402
from mamba_asr.transcriber import Transcriber  # noqa: E402

DEMO = REPO / "data" / "demo"
SAMPLE_RATE = 16000
CHUNK_SECONDS = 0.16
MARKS = (10.0, 60.0, 600.0)
WINDOW_SECONDS = 8.0
# The bounded models (~6 min on a 2-core CPU for 10 minutes of audio). The streaming Conformer's
# cost follows its left context: add "conformer_streaming_small:stream_left_context=2000"
# (640 s: all of a 10-minute stream) to see it grow (20+ minutes of compute on its own).
DEFAULT_CONFIGS = ["conmamba_streaming_demo", "conformer_streaming_demo",
                   "conmamba_streaming_small", "conformer_streaming_small"]


def utterances(split: str) -> list[Path]:
    return sorted((DEMO / "LibriSpeech" / split).glob("*/*/*.flac"))


def transcripts(split: str) -> dict[str, list[str]]:
    truth = {}
    for path in sorted((DEMO / "LibriSpeech" / split).glob("*/*/*.trans.txt")):
        for line in path.read_text().splitlines():
            uid, text = line.split(" ", 1)
            truth[uid] = text.split()
    return truth


def chunked(wav: torch.Tensor, seconds: float = CHUNK_SECONDS) -> list[torch.Tensor]:
    step = round(seconds * SAMPLE_RATE)
    return [wav[i:i + step] for i in range(0, wav.numel(), step)]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


# --------------------------------------------------------------------------- cost per chunk


def tiled_speech(seconds: float) -> torch.Tensor:
    """Demo test-clean utterances end to end, tiled to ``seconds``."""
    files = utterances("test-clean")
    pieces, total = [], 0
    while total < seconds * SAMPLE_RATE:
        wav = audio_io.load_audio(files[len(pieces) % len(files)], SAMPLE_RATE)
        pieces.append(wav)
        total += wav.numel()
    return torch.cat(pieces)[: round(seconds * SAMPLE_RATE)]


def cost(configs: Sequence[str], minutes: float) -> None:
    marks = [m for m in MARKS if m <= minutes * 60]
    wav = tiled_speech(minutes * 60)
    chunks = chunked(wav)
    streams, lookahead = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            config, _, settings = name.partition(":")  # name:key=value,... overrides
            overrides = [f"--{s}".replace("=", " ", 1).split(" ", 1) for s in
                         settings.split(",") if s]
            export_untrained(str(REPO / "hparams" / "CTC" / f"{config}.yaml"),
                             Path(tmp) / name.replace(":", "-"),
                             overrides=[a for pair in overrides for a in pair])
            asr = Transcriber.from_folder(Path(tmp) / name.replace(":", "-"))
            streams[name] = asr.stream()
            lookahead[name] = streams[name].lookahead_seconds
            params = sum(p.numel() for p in asr.asr.mods.parameters())
            print(f"{name}: {params / 1e6:.2f} M parameters, look-ahead "
                  f"{1000 * lookahead[name]:.0f} ms", flush=True)
    spent: dict[str, list[float]] = {name: [] for name in configs}
    for chunk in chunks:  # the models take turns
        for name, stream in streams.items():
            start = time.perf_counter()
            stream.feed(chunk)
            spent[name].append(time.perf_counter() - start)
    window = round(WINDOW_SECONDS / CHUNK_SECONDS)
    print(f"\nCompute per 160-ms chunk (mean of the {WINDOW_SECONDS:.0f} s before each mark, "
          f"ms) and real-time factor; random weights; {machine()}")
    head = " | ".join(f"at {m:g} s" for m in marks)
    print(f"| model | {head} | last / first |")
    print("|---|" + "---|" * len(marks) + "---|")
    for name, times in spent.items():
        means = []
        for mark in marks:
            end = round(mark / CHUNK_SECONDS)
            means.append(statistics.fmean(times[end - window:end]))
        cells = " | ".join(f"{1000 * m:.1f} ms (RTF {m / CHUNK_SECONDS:.3f})" for m in means)
        print(f"| {name} | {cells} | {means[-1] / means[0]:.2f} |")


# --------------------------------------------------------------------------- latency


def latency(models: dict[str, str]) -> None:
    from mamba_asr.demo_corpus import read_word_times

    reference = read_word_times(DEMO, "test-clean")
    files = utterances("test-clean")
    wavs = {f.stem: audio_io.load_audio(f, SAMPLE_RATE) for f in files}
    print(f"\nLatency on demo test-clean ({len(files)} utterances), 160-ms chunks; {machine()}")
    print("| model | look-ahead | algorithmic latency | words matched | mean delay after the "
          "word's end (audio) | median | 90th pct | mean incl. compute | mean compute / chunk |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, model in models.items():
        asr = Transcriber.load(model)
        delays, walls, computes, matched, ref_words = [], [], [], 0, 0
        look = 0.0
        for uid, wav in wavs.items():
            stream = asr.stream()
            look = stream.lookahead_seconds
            emitted: list[tuple[float, float]] = []  # (audio time, + compute) per final word
            for chunk in chunked(wav):
                update = stream.feed(chunk)
                computes.append(update.timings["compute"])
                emitted += [(update.seconds, update.seconds + update.timings["compute"])
                            ] * len(update.words)
            start = time.perf_counter()
            stream.finish()
            done = time.perf_counter() - start
            words = stream.final_words
            emitted += [(stream.seconds, stream.seconds + done)] * (len(words) - len(emitted))
            ref = reference[uid]
            ref_words += len(ref)
            ops = alignment(op_table([r[0] for r in ref], [w.word for w in words]))
            for op, i, j in ops:
                if op == EDIT_SYMBOLS["eq"]:
                    matched += 1
                    delays.append(emitted[j][0] - ref[i][2])
                    walls.append(emitted[j][1] - ref[i][2])
        delays.sort()
        print(f"| {label} | {1000 * look:.0f} ms | {1000 * (look + CHUNK_SECONDS):.0f} ms | "
              f"{matched} / {ref_words} | {1000 * statistics.fmean(delays):.0f} ms | "
              f"{1000 * statistics.median(delays):.0f} ms | "
              f"{1000 * delays[int(0.9 * (len(delays) - 1))]:.0f} ms | "
              f"{1000 * statistics.fmean(walls):.0f} ms | "
              f"{1000 * statistics.fmean(computes):.1f} ms |", flush=True)


# --------------------------------------------------------------------------- WER


def wer(models: dict[str, str]) -> None:
    splits = ["test-clean", "test-other"]
    print("\nDemo-corpus WER (%), greedy CTC; offline = whole utterances, streamed = 160-ms "
          "chunks")
    print("| model | " + " | ".join(f"{s} offline | {s} streamed" for s in splits) + " |")
    print("|---|" + "---|---|" * len(splits))
    for label, model in models.items():
        asr = Transcriber.load(model)
        try:
            asr.stream()
            streams = True
        except ValueError:
            streams = False
        cells = []
        for split in splits:
            files, truth = utterances(split), transcripts(split)
            offline, streamed = ErrorRateStats(), ErrorRateStats()
            ids = [f.stem for f in files]
            refs = [truth[i] for i in ids]
            hyps = [t.text.split() for t in asr.transcribe(files)]
            offline.append(ids, hyps, refs)
            cells.append(f"{offline.summarize('error_rate'):.2f}")
            if not streams:
                cells.append("—")
                continue
            hyps = []
            for f in files:
                stream = asr.stream()
                for chunk in chunked(audio_io.load_audio(f, SAMPLE_RATE)):
                    stream.feed(chunk)
                hyps.append(stream.finish().text.split())
            streamed.append(ids, hyps, refs)
            cells.append(f"{streamed.summarize('error_rate'):.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def named(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep:
            raise SystemExit(f"--models takes label=folder pairs, got {pair!r}")
        out[label] = path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["cost", "latency", "wer"])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--models", nargs="+", default=[], help="label=run or export folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "cost":
        cost(args.configs, args.minutes)
    elif args.what == "latency":
        latency(named(args.models))
    else:
        wer(named(args.models))


if __name__ == "__main__":
    main()
