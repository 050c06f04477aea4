#!/usr/bin/env python3
"""Benchmark onnxruntime fp32 / int8 against PyTorch eager: RTF, peak memory, sizes, int8 WER.

Usage:
    python bench/bench_onnx.py                       # 10 s, 60 s, 10 min; 3 repeats; demo WER
    python bench/bench_onnx.py --quick               # 10 s and 60 s, 1 repeat
    python bench/bench_onnx.py --models ConMamba-S --lengths 600 --repeats 1 --no_wer
    python bench/bench_onnx.py --demo_model models/demo-ctc --work /tmp/bench-onnx

Speed: ``hparams/CTC/conmamba_small.yaml`` and ``conformer_small.yaml`` with random weights
(``export_untrained(..., onnx=True, quantize="int8")``; the weights do not change the speed),
exported once into ``--work`` and reused while the configuration and the exporting code are
unchanged. Input: demo test-clean speech tiled to each length, one file, batch of one. Three
engines compute the CTC log-probabilities of the same waveform:

- ``PyTorch eager fp32``: SpeechBrain's ``EncoderASR.encode_batch`` under ``torch.no_grad``
  (Fbank, normaliser, CNN front-end, encoder, CTC head; the default scan path);
- ``onnxruntime fp32`` / ``int8``: ``features.onnx`` then ``model.onnx`` / ``model.int8.onnx``
  (``OnnxTranscriber.log_probs``), in a process that imports no torch.

Each run is a fresh process (so one engine's allocations or thread pools do not touch
another's) under an address-space limit (``--memory_limit_gb``) and a time limit
(``--timeout``): load, one warm-up call and one timed call on the same input; it reports the
timed call's seconds and the process's peak resident memory (VmHWM, everything included)
after the first call (one file, as ``transcribe.py`` runs it) and after the second.
Repeats interleave the engines (repeat 1 of each engine, then repeat 2, ...) so machine noise
hits all alike; RTF = the best repeat's seconds / audio seconds. Each engine's log-probabilities
are compared with eager's (max abs difference). The 10-minute check: onnxruntime's peak on
ConMamba-S at 10 min against 4,000 MB. WER: the trained demo models (``--demo_model``, by
default ``make demo``'s models/demo-ctc and ``make demo-s2s``'s models/demo-s2s; their ONNX
files are exported into a copy in ``--work`` when they have none), eager (``Transcriber``) and
onnxruntime fp32 / int8 (``OnnxTranscriber``) on the demo corpus' test-clean and test-other
utterances against their transcripts (SpeechBrain's ``ErrorRateStats``): CTC greedy; S2S
the folder's beam search without its LM and with it; and how many transcripts differ from
eager's. MB = 10^6 bytes.

On a machine shared with other jobs pass ``--threads 1``: with more threads than free cores,
torch's OpenMP threads wait for each other at every operator (eager was 10-25x slower with 2
threads than with 1 at a load of 10 on 2 cores) while onnxruntime's pool degrades far less, so
the ratio would measure the load, not the engines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {"ConMamba-S": "hparams/CTC/conmamba_small.yaml",
           "Conformer-S": "hparams/CTC/conformer_small.yaml"}
ENGINES = {"eager": "PyTorch eager fp32", "ort": "onnxruntime fp32", "ort-int8": "onnxruntime int8"}
CHECK_MODEL, CHECK_SECONDS, CHECK_LIMIT_MB = "ConMamba-S", 600.0, 4000.0
RATE = 16000
WER_SETS = ("test-clean", "test-other")
# what decides the exported graphs besides the configuration
EXPORT_CODE = ("mamba_asr/onnx_export.py", "mamba_asr/export.py", "mamba_asr/inference_yaml.py")


def audio_label(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


# --------------------------------------------------------------------------- one run (child)


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where there is no /proc)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6


def engine_run(engine: str, folder: str, audio: str, save: str, threads: int,
               limit_gb: float) -> dict:
    """One measurement of ``engine`` on the waveform in ``audio`` (.npy), in this fresh process:
    seconds of the timed call (the second on the same input), peak memory after the first call
    (one file, as transcribe.py) and after the second (a process that goes on); the
    log-probabilities (T', V) go to ``save`` unless it is empty."""
    limit = int(limit_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    wav = np.load(audio)
    if engine == "eager":
        import mamba_asr  # noqa: F401  (drops SpeechBrain's torchvision notice)

        # isort: split
        import torch

        from mamba_asr.transcriber import Transcriber

        if threads:
            torch.set_num_threads(threads)
        asr = Transcriber.from_folder(folder).asr
        batch, ones = torch.from_numpy(wav)[None], torch.ones(1)

        def run() -> np.ndarray:
            with torch.no_grad():
                return asr.encode_batch(batch, ones)[0].numpy()
    else:
        from mamba_asr.ort.transcriber import OnnxTranscriber

        ort = OnnxTranscriber.from_folder(folder, quantized=engine == "ort-int8",
                                          threads=threads or None)
        lengths = np.array([len(wav)], dtype=np.int64)

        def run() -> np.ndarray:
            log_probs, frames = ort.log_probs(wav[None], lengths)
            return log_probs[0, : frames[0]]
    loaded = peak_mb()
    try:
        run()
        first = peak_mb()
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
    except Exception as exc:  # torch's RuntimeError, onnxruntime's own, MemoryError
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "loaded_mb": loaded}
    if save:
        np.save(save, out)
    return {"ok": True, "seconds": seconds, "first_peak_mb": first, "peak_mb": peak_mb(),
            "loaded_mb": loaded, "torch_imported": "torch" in sys.modules}


# --------------------------------------------------------------------------- models


def source_stamp(*texts: str) -> str:
    """A digest of ``texts``, the exporting code (``modules/``, :data:`EXPORT_CODE`) and the
    versions of torch, onnx and onnxruntime: an export made under another stamp is stale."""
    import onnx
    import onnxruntime
    import torch

    digest = hashlib.sha256()
    files = sorted({*(REPO / "modules").rglob("*.py"), *(REPO / f for f in EXPORT_CODE)})
    for path in files:
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    for text in (*texts, torch.__version__, onnx.__version__, onnxruntime.__version__):
        digest.update(text.encode())
    return digest.hexdigest()


def _is_current(folder: Path, stamp: str) -> bool:
    record = folder.with_suffix(".stamp")
    return ((folder / "model.int8.onnx").is_file() and record.is_file()
            and record.read_text().strip() == stamp)


def random_export(name: str, work: Path) -> Path:
    """The random-weight export folder (ONNX fp32 + int8) of model ``name``, made when absent
    or stale."""
    from mamba_asr.export import export_untrained

    config = REPO / CONFIGS[name]
    folder = work / config.stem
    stamp = source_stamp(config.read_text(encoding="utf-8"))
    if not _is_current(folder, stamp):
        print(f"exporting {name} ({config.relative_to(REPO)}) into {folder} ...",
              file=sys.stderr, flush=True)
        export_untrained(str(config), folder, overwrite=True, name=f"{name} (random weights)",
                         onnx=True, quantize="int8")
        folder.with_suffix(".stamp").write_text(stamp + "\n")
    return folder


def demo_export(model: Path, work: Path) -> Path:
    """``model`` itself when it has its fp32 and int8 ONNX files, else a copy in ``work``
    with them added (made when absent or stale)."""
    from mamba_asr.model_card import read_card
    from mamba_asr.onnx_export import export_onnx

    card = read_card(model)
    main = "encoder" if card["family"] == "S2S" else "model"
    if (model / f"{main}.onnx").is_file() and (model / f"{main}.int8.onnx").is_file():
        return model
    folder = work / f"demo-{model.name}"
    stamp = source_stamp(json.dumps(card["files"], sort_keys=True))
    if not _is_current(folder, stamp):
        print(f"exporting {model} to ONNX in {folder} ...", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model, folder)
        export_onnx(folder, quantize="int8")
        folder.with_suffix(".stamp").write_text(stamp + "\n")
    return folder


# --------------------------------------------------------------------------- speed and memory


@dataclass
class Runs:
    """One model x length x engine: the results of its repeats."""

    results: list[dict]
    log_probs: np.ndarray | None = None

    @property
    def failure(self) -> str | None:
        failed = [r for r in self.results if not r["ok"]]
        return failed[0]["error"] if failed else None

    @property
    def best_seconds(self) -> float:
        return min(r["seconds"] for r in self.results)

    @property
    def first_peak_mb(self) -> float:
        return max(r["first_peak_mb"] for r in self.results)

    @property
    def peak_mb(self) -> float:
        return max(r["peak_mb"] for r in self.results)


def run_child(engine: str, folder: Path, audio: Path, save: Path | None,
              args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "_engine", engine, str(folder), str(audio),
           str(save or ""), str(args.threads), str(args.memory_limit_gb)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not finish in {args.timeout:g} s (--timeout)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:160]}"}
    result = json.loads(lines[-1])
    if not result["ok"]:
        result["error"] = failure_reason(result["error"], args.memory_limit_gb)
    return result


def failure_reason(error: str, limit_gb: float) -> str:
    """A run's error in one short line; an allocation refused (torch's or onnxruntime's
    message) as not fitting in the address-space limit."""
    size = re.search(r"allocate (\d+) bytes|buffer of size (\d+)", error)
    if size:
        wanted = int(size.group(1) or size.group(2)) / 1e9
        return f"does not fit in {limit_gb:g} GiB (an allocation of {wanted:.1f} GB refused)"
    if "alloc" in error.lower() or error.startswith("MemoryError"):
        return f"does not fit in {limit_gb:g} GiB ({error.splitlines()[0][:120]})"
    return error.splitlines()[0][:160]


def measure(folders: dict[str, Path], audios: dict[float, Path], args: argparse.Namespace,
            scratch: Path) -> dict[tuple[str, float, str], Runs]:
    """Every model x length x engine, ``args.repeats`` times, engines interleaved."""
    runs: dict[tuple[str, float, str], Runs] = {}
    for name, folder in folders.items():
        for seconds, audio in audios.items():
            keys = [(name, seconds, engine) for engine in ENGINES]
            for key in keys:
                runs[key] = Runs([])
            for repeat in range(args.repeats):
                for key in keys:
                    if runs[key].failure:
                        continue
                    save = scratch / f"{key[2]}.npy" if repeat == 0 else None
                    result = run_child(key[2], folder, audio, save, args)
                    runs[key].results.append(result)
                    if save is not None and result["ok"]:
                        runs[key].log_probs = np.load(save)
                    print(name, audio_label(seconds), ENGINES[key[2]], f"repeat {repeat + 1}",
                          result, file=sys.stderr, flush=True)
    return runs


def max_difference(a: np.ndarray | None, b: np.ndarray | None) -> str:
    if a is None or b is None:
        return "-"
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    return f"{float(np.abs(a - b).max()):.1e}"


def speed_table(runs: dict[tuple[str, float, str], Runs]) -> None:
    print("\n| model | audio | engine | RTF | speed-up vs eager fp32 | peak MB, 1st / 2nd call | "
          "max abs Δ log-prob vs eager |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (name, seconds, engine), r in runs.items():
        head = f"| {name} | {audio_label(seconds)} | {ENGINES[engine]} |"
        if r.failure:
            print(f"{head} not measured: {r.failure} | | | |")
            continue
        eager = runs[(name, seconds, "eager")]
        speedup = "-" if eager.failure else f"{eager.best_seconds / r.best_seconds:.2f}×"
        difference = "-" if engine == "eager" else max_difference(r.log_probs, eager.log_probs)
        print(f"{head} {r.best_seconds / seconds:.4f} | {speedup} | "
              f"{r.first_peak_mb:,.0f} / {r.peak_mb:,.0f} | "
              f"{difference} |")


def check_table(runs: dict[tuple[str, float, str], Runs]) -> None:
    print(f"\n10-minute file in one pass, {CHECK_MODEL}, peak memory of the process "
          f"(goal < {CHECK_LIMIT_MB:,.0f} MB)")
    print("| engine | peak MB, one file (1st call) | result | peak MB, a 2nd file in the same "
          "process | result |")
    print("|---|---:|---|---:|---|")
    for engine in ("ort", "ort-int8"):
        r = runs.get((CHECK_MODEL, CHECK_SECONDS, engine))
        if r is None:
            print(f"| {ENGINES[engine]} | - | not run (add {CHECK_MODEL} and 600 to --models "
                  "and --lengths) | - | - |")
        elif r.failure:
            print(f"| {ENGINES[engine]} | - | FAIL: {r.failure} | - | - |")
        else:
            cells = [f"{mb:,.0f} | {'PASS' if mb < CHECK_LIMIT_MB else 'FAIL'}"
                     for mb in (r.first_peak_mb, r.peak_mb)]
            print(f"| {ENGINES[engine]} | " + " | ".join(cells) + " |")


def sizes_table(folders: dict[str, Path]) -> None:
    """Each folder's file sizes; a CTC model's model*.onnx and an S2S model's encoder*.onnx
    share a column."""
    columns = (("features.onnx",), ("model.onnx", "encoder.onnx"),
               ("model.int8.onnx", "encoder.int8.onnx"), ("decoder_init.onnx",),
               ("decoder_step.onnx",), ("decoder_step.int8.onnx",), ("lm.onnx",), ("asr.ckpt",))
    print("\n| model | " + " | ".join(" / ".join(c) for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, folder in folders.items():
        cells = []
        for names in columns:
            found = [folder / f for f in names if (folder / f).is_file()]
            cells.append(f"{found[0].stat().st_size / 1e6:.1f}" if found else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------- WER


def test_set(split: str) -> list[tuple[str, Path, list[str]]]:
    """(utterance id, flac, reference words) of a demo corpus split, in id order."""
    root = REPO / "data" / "demo" / "LibriSpeech" / split
    refs = {}
    for trans in root.glob("*/*/*.trans.txt"):
        for line in trans.read_text(encoding="utf-8").splitlines():
            uid, _, text = line.partition(" ")
            refs[uid] = text.split()
    if not refs:
        sys.exit(f"{root}: no transcripts; build the demo corpus first (`make corpus`)")
    return [(uid, root.joinpath(*uid.split("-")[:2], f"{uid}.flac"), refs[uid])
            for uid in sorted(refs)]


def wer_engines(folder: Path, s2s: bool, threads: int) -> dict[str, tuple[Callable, str]]:
    """The WER table's engines: label -> (loader, label of the engine it is compared with).

    CTC: greedy search. S2S: the folder's beam search, without the LM (eager, onnxruntime
    fp32 and int8) and with it (eager, onnxruntime fp32).
    """
    from mamba_asr.ort.transcriber import OnnxTranscriber
    from mamba_asr.transcriber import Transcriber

    ort = {"threads": threads or None}
    variants = [({"no_lm": True}, ", no LM"), ({}, " + LM")] if s2s else [({"search": "greedy"},
                                                                            "")]
    engines = {}
    for options, suffix in variants:
        eager = f"PyTorch eager fp32{suffix}"
        engines[eager] = (lambda o=options: Transcriber.from_folder(folder, **o), eager)
        engines[f"onnxruntime fp32{suffix}"] = (
            lambda o=options: OnnxTranscriber.from_folder(folder, **o, **ort), eager)
        if "search" in options or options.get("no_lm"):
            engines[f"onnxruntime int8{suffix}"] = (
                lambda o=options: OnnxTranscriber.from_folder(folder, quantized=True, **o, **ort),
                eager)
    return engines


def wer_table(model: Path, folder: Path, threads: int) -> None:
    import mamba_asr  # noqa: F401

    # isort: split
    import torch
    from speechbrain.utils.metric_stats import ErrorRateStats

    from mamba_asr.model_card import read_card

    if threads:
        torch.set_num_threads(threads)
    s2s = read_card(folder)["family"] == "S2S"
    engines = wer_engines(folder, s2s, threads)
    sets = {split: test_set(split) for split in WER_SETS}
    rows, texts = {}, {}
    for engine, (load, reference) in engines.items():
        asr = load()
        cells, seconds = [], 0.0
        for split, utterances in sets.items():
            start = time.perf_counter()
            hyps = [t.text for t in asr.transcribe([path for _, path, _ in utterances])]
            seconds += time.perf_counter() - start
            texts[engine, split] = hyps
            stats = ErrorRateStats()
            stats.append([u for u, _, _ in utterances], [h.split() for h in hyps],
                         [ref for _, _, ref in utterances])
            cells.append(stats.summarize("error_rate"))
        differ = sum(a != b for split in WER_SETS
                     for a, b in zip(texts[engine, split], texts[reference, split], strict=True))
        rows[engine] = (cells, "—" if reference == engine else str(differ), seconds)
    total = sum(len(u) for u in sets.values())
    search = "its beam search" if s2s else "greedy search"
    print(f"\nDemo model {model} ({folder}), {search}, "
          + ", ".join(f"{s} {len(u)} utterances" for s, u in sets.items()))
    print("| engine | " + " | ".join(f"{s} WER %" for s in WER_SETS)
          + f" | transcripts differing from eager (of {total}) | transcription s |")
    print("|---|" + "---:|" * len(WER_SETS) + "---:|---:|")
    for engine, (cells, differ, seconds) in rows.items():
        print(f"| {engine} | " + " | ".join(f"{c:.2f}" for c in cells)
              + f" | {differ} | {seconds:.1f} |")


# --------------------------------------------------------------------------- main


def machine_line(threads: int) -> str:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    used = f"{threads} thread{'s' * (threads > 1)} per engine" if threads else (
        f"default threads (torch {torch.get_num_threads()}, onnxruntime one per core)")
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB; torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}; {used}")


def main() -> None:
    if sys.argv[1:2] == ["_engine"]:  # one measurement, in a fresh process
        engine, folder, audio, save, threads, limit = sys.argv[2:8]
        print(json.dumps(engine_run(engine, folder, audio, save, int(threads), float(limit))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--lengths", type=float, nargs="+", default=[10.0, 60.0, 600.0],
                        help="audio lengths in seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine (best)")
    parser.add_argument("--quick", action="store_true", help="10 s and 60 s, 1 repeat")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of every engine (0: each engine's default)")
    parser.add_argument("--memory_limit_gb", type=float, default=16.0,
                        help="address-space limit of each run (GiB)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "mamba-asr-bench-onnx",
                        help="folder of the exports (reused while current) and inputs")
    parser.add_argument("--demo_model", type=Path, nargs="+",
                        default=[REPO / "models" / "demo-ctc", REPO / "models" / "demo-s2s"],
                        help="trained export folders (CTC or S2S) for the WER tables")
    parser.add_argument("--no_wer", action="store_true", help="skip the WER tables")
    parser.add_argument("--no_speed", action="store_true",
                        help="only the WER tables (and the demo models' sizes)")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats = [10.0, 60.0], 1
    if (args.repeats < 1 or min(args.lengths) <= 0 or args.threads < 0
            or args.memory_limit_gb <= 0 or args.timeout <= 0):
        parser.error("--repeats, --lengths, --memory_limit_gb and --timeout must be positive, "
                     "--threads at least 0")
    for model in [] if args.no_wer else args.demo_model:
        if not (model / "model_card.json").is_file():
            parser.error(f"--demo_model {model}: not an export folder (no model_card.json); "
                         "run `make demo` (`make demo-s2s`), pass others, or add --no_wer")
    args.work.mkdir(parents=True, exist_ok=True)

    from bench_transcribe import tiled_speech

    folders = {} if args.no_speed else {name: random_export(name, args.work)
                                        for name in args.models}
    demos = {} if args.no_wer else {m: demo_export(m, args.work) for m in args.demo_model}
    if folders:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            scratch = Path(tmp)
            audios = {}
            for seconds in args.lengths:
                audios[seconds] = scratch / f"speech-{seconds:g}s.npy"
                np.save(audios[seconds], tiled_speech(seconds).numpy().astype(np.float32))
            runs = measure(folders, audios, args, scratch)
        print(f"\n# ONNX vs PyTorch eager, random weights, batch 1; "
              f"{machine_line(args.threads)}; best of {args.repeats}, each run in its own "
              f"process under {args.memory_limit_gb:g} GiB")
        speed_table(runs)
        check_table(runs)
    print("\nFile sizes (MB)")
    sizes_table({**folders, **{f"{m.name} (trained)": d for m, d in demos.items()}})
    for model, folder in demos.items():
        wer_table(model, folder, args.threads)


if __name__ == "__main__":
    main()
