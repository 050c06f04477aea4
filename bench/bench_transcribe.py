#!/usr/bin/env python3
"""Benchmark transcription: long files in one pass, batching, word times, one pass vs utterances.

Usage:
    python bench/bench_transcribe.py speed                 # ConMamba-S vs Conformer-S CTC
    python bench/bench_transcribe.py speed --seconds 10 60 600 3600
    python bench/bench_transcribe.py batching --model models/demo-ctc
    python bench/bench_transcribe.py timestamps --model models/demo-ctc
    python bench/bench_transcribe.py long --model models/demo-ctc
    python bench/bench_transcribe.py all --model models/demo-ctc

``speed``: real-time factor (seconds of compute per second of audio: features, encoder, CTC
decoding and word alignment; loading excluded) and peak RSS of one-pass transcription at each
length, for ``hparams/CTC/conmamba_small.yaml`` and ``conformer_small.yaml`` with random
weights (a fresh process per measurement, under a 16 GiB address-space limit: a run that
cannot allocate is reported as not fitting). The audio is demo-corpus speech tiled to length.
``batching``: 200 demo test utterances, length-sorted batches vs one at a time.
``timestamps``: mean absolute word-boundary error on the demo test-clean set against the
corpus' word times (needs an exported demo model and the corpus' word-time files).
``long``: a 10-minute file made of demo test-clean utterances end to end in one pass vs the
utterances one by one: each one's WER against the transcripts, the WER between the two, and
how many of the words they share fall inside their source utterance's span (+-0.2 s).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import mamba_asr  # noqa: E402,F401  (drops SpeechBrain's torchvision notice)

# isort: split
import torch  # noqa: E402

from mamba_asr import audio_io  # noqa: E402
from mamba_asr.export import export_untrained  # noqa: E402
from mamba_asr.transcriber import Transcriber  # noqa: E402

DEMO = REPO / "data" / "demo"
CONFIGS = {"ConMamba-S": "hparams/CTC/conmamba_small.yaml",
           "Conformer-S": "hparams/CTC/conformer_small.yaml"}
MEMORY_LIMIT = 16 << 30
SPAN_TOLERANCE = 0.2


def random_transcriber(config: str, **options: object) -> Transcriber:
    """A CTC configuration's model as initialised (random weights), through an export folder."""
    with tempfile.TemporaryDirectory() as tmp:
        export_untrained(str(REPO / config), Path(tmp) / "model")
        return Transcriber.from_folder(Path(tmp) / "model", **options)


def demo_utterances(split: str = "test-clean") -> list[Path]:
    files = sorted((DEMO / "LibriSpeech" / split).glob("*/*/*.flac"))
    if not files:
        sys.exit(f"no demo corpus at {DEMO}: run `make corpus` first")
    return files


def tiled_speech(seconds: float) -> torch.Tensor:
    """Demo speech (test-clean utterances in turn) tiled to ``seconds`` at 16 kHz."""
    pieces, total, need = [], 0, int(seconds * 16000)
    files = demo_utterances()
    while total < need:
        wav = audio_io.load_audio(files[len(pieces) % len(files)], 16000)
        pieces.append(wav)
        total += len(wav)
    return torch.cat(pieces)[:need]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- speed


def speed_child(config: str, seconds: float) -> dict:
    """One measurement in this (fresh) process."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    asr = random_transcriber(config, one_pass=True, max_pass_seconds=10 * 3600)
    wav = tiled_speech(seconds)
    next(iter(asr.transcribe([(wav[:32000], 16000)])))  # warm-up
    base = peak_rss_mb()
    start = time.perf_counter()
    try:
        t = next(iter(asr.transcribe([(wav, 16000)])))
    except (RuntimeError, MemoryError) as exc:
        return {"fits": False, "error": str(exc).splitlines()[0][:120], "base_mb": base}
    elapsed = time.perf_counter() - start
    return {"fits": True, "rtf": elapsed / seconds, "peak_mb": peak_rss_mb(), "base_mb": base,
            "words": len(t.words)}


def speed(lengths: list[float]) -> None:
    rows = []
    for name, config in CONFIGS.items():
        stopped = False
        for seconds in lengths:
            if stopped:
                rows.append((name, seconds, None))
                continue
            cmd = [sys.executable, __file__, "_speed_child", config, str(seconds)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            result = json.loads(lines[-1]) if lines else {
                "fits": False, "error": f"exit {proc.returncode}: {proc.stderr[-200:]}"}
            rows.append((name, seconds, result))
            stopped = not result["fits"]
            print(name, seconds, result, file=sys.stderr, flush=True)
    print(f"\nOne-pass transcription, random weights, {platform.processor() or 'CPU'}, "
          f"{torch.get_num_threads()} threads")
    print("| model | audio | real-time factor | peak RSS (MB) | RSS over loaded model (MB) |")
    print("|---|---|---|---|---|")
    for name, seconds, r in rows:
        audio = f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
        if r is None:
            print(f"| {name} | {audio} | not run (a shorter file did not fit) | | |")
        elif not r["fits"]:
            print(f"| {name} | {audio} | does not fit: {r['error']} | | |")
        else:
            print(f"| {name} | {audio} | {r['rtf']:.4f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] - r['base_mb']:.0f} |")


# --------------------------------------------------------------------------- batching


def batching(model: str, count: int = 200) -> None:
    files = (demo_utterances("test-clean") + demo_utterances("test-other"))[:count]
    asr = Transcriber.load(model)
    wavs = [(audio_io.load_audio(f, 16000), 16000) for f in files]
    seconds = sum(len(w) for w, _ in wavs) / 16000
    results = {}
    for label, max_batch in (("one at a time", 0.0), ("batched (120 s)", 120.0)):
        asr.max_batch_seconds = max_batch
        next(iter(asr.transcribe(wavs[:2])))
        start = time.perf_counter()
        texts = [t.text for t in asr.transcribe(wavs)]
        results[label] = (time.perf_counter() - start, texts)
    one, batched = results["one at a time"][0], results["batched (120 s)"][0]
    same = sum(a == b for a, b in zip(results["one at a time"][1], results["batched (120 s)"][1],
                                      strict=True))
    print(f"\n{len(files)} demo test utterances ({seconds / 60:.1f} min), {model}")
    print("| mode | seconds | utterances / s | speed-up |")
    print("|---|---|---|---|")
    for label, (elapsed, _) in results.items():
        print(f"| {label} | {elapsed:.1f} | {len(files) / elapsed:.1f} | {one / elapsed:.2f}x |")
    print(f"identical transcripts: {same} of {len(files)}; batched/one-at-a-time "
          f"throughput {one / batched:.2f}x")


# --------------------------------------------------------------------------- word times


def timestamps(model: str) -> None:
    from mamba_asr.alignment import BoundaryStats, boundary_errors
    from mamba_asr.demo_corpus import read_word_times

    reference = read_word_times(DEMO, "test-clean")
    files = {f.stem: f for f in demo_utterances("test-clean")}
    asr = Transcriber.load(model)
    total = BoundaryStats()
    for uid, t in zip(files, asr.transcribe(list(files.values())), strict=True):
        total += boundary_errors(reference[uid], t.words)
    print(f"\nWord boundaries on demo test-clean ({len(files)} utterances), {model}")
    print("| words matched / reference | mean start error (ms) | mean end error (ms) | "
          "mean boundary error (ms) |")
    print("|---|---|---|---|")
    print(f"| {total.matched} / {total.reference_words} | {1000 * total.start_error:.0f} | "
          f"{1000 * total.end_error:.0f} | {1000 * total.boundary_error:.0f} |")


# --------------------------------------------------------------------------- one pass


def long_file(model: str, minutes: float = 10.0) -> None:
    from speechbrain.utils.edit_distance import accumulatable_wer_stats

    def wer(refs: list[list[str]], hyps: list[list[str]]) -> float:
        return accumulatable_wer_stats(refs, hyps, collections.Counter())["WER"]

    asr = Transcriber.load(model)
    files = demo_utterances("test-clean")
    truth = {}
    for path in sorted(files[0].parents[2].glob("*/*/*.trans.txt")):
        for line in path.read_text().splitlines():
            uid, text = line.split(" ", 1)
            truth[uid] = text.split()
    pieces, spans, names, at = [], [], [], 0
    while at < minutes * 60 * 16000:  # end to end: each keeps its own ~0.27 s of silence
        path = files[len(spans) % len(files)]
        wav = audio_io.load_audio(path, 16000)
        pieces.append(wav)
        names.append(path.stem)
        spans.append((at / 16000, (at + len(wav)) / 16000))
        at += len(wav)
    whole = torch.cat(pieces)
    start = time.perf_counter()
    one = next(iter(asr.transcribe([(whole, 16000)])))
    one_s = time.perf_counter() - start
    start = time.perf_counter()
    each = list(asr.transcribe([(p, 16000) for p in pieces]))
    each_s = time.perf_counter() - start
    segmented = Transcriber.load(model, max_pass_seconds=30.0)  # VAD segments of <= 30 s
    start = time.perf_counter()
    vad = next(iter(segmented.transcribe([(whole, 16000)])))
    vad_s = time.perf_counter() - start
    ref = [w for t in each for w in t.text.split()]
    hyp = [w.word for w in one.words]
    reference = [w for n in names for w in truth[n]]
    # each one-pass word matched to an utterance-by-utterance word: inside that utterance?
    source = [i for i, t in enumerate(each) for _ in t.text.split()]
    inside = total = 0
    for op, i, j in _align(ref, hyp):
        if op == "=":
            a, b = spans[source[i]]
            w = one.words[j]
            total += 1
            inside += a - SPAN_TOLERANCE <= w.start and w.end <= b + SPAN_TOLERANCE
    print(f"\n{whole.numel() / 16000 / 60:.1f}-minute file of {len(spans)} demo test-clean "
          f"utterances end to end, {model}")
    print("| transcription | seconds | words | WER vs the transcripts | WER vs utterance by "
          "utterance | matched words inside their utterance (+-0.2 s) |")
    print("|---|---|---|---|---|---|")
    print(f"| utterance by utterance | {each_s:.1f} | {len(ref)} | "
          f"{wer([reference], [ref]):.2f} % | - | - |")
    print(f"| one pass | {one_s:.1f} | {len(hyp)} | {wer([reference], [hyp]):.2f} % | "
          f"{wer([ref], [hyp]):.2f} % | {inside} of {total} "
          f"({100 * inside / max(total, 1):.1f} %) |")
    vad_words = vad.text.split()
    print(f"| VAD segments (<= 30 s) | {vad_s:.1f} | {len(vad_words)} | "
          f"{wer([reference], [vad_words]):.2f} % | {wer([ref], [vad_words]):.2f} % | - |")


def _align(ref: list[str], hyp: list[str]) -> list[tuple[str, int, int]]:
    """Edit-distance alignment of two word lists: (op, ref index, hyp index)."""
    from speechbrain.utils.edit_distance import alignment, op_table

    return [(op, i, j) for op, i, j in alignment(op_table(ref, hyp))]


def main() -> None:
    if sys.argv[1:2] == ["_speed_child"]:  # one speed measurement, in a fresh process
        print(json.dumps(speed_child(sys.argv[2], float(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="+", choices=["speed", "batching", "timestamps", "long",
                                                    "all"])
    parser.add_argument("--model", default="models/demo-ctc", help="an export or run folder")
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 60, 600, 3600])
    args = parser.parse_args()
    what = {"speed", "batching", "timestamps", "long"} if "all" in args.what else set(args.what)
    if "speed" in what:
        speed(args.seconds)
    if "batching" in what:
        batching(args.model)
    if "timestamps" in what:
        timestamps(args.model)
    if "long" in what:
        long_file(args.model)


if __name__ == "__main__":
    main()
