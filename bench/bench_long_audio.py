#!/usr/bin/env python3
"""Benchmark the front-end of long recordings: Fbank + windowed normalisation + CNN front-end in
one call vs in chunks (``mamba_asr.long_audio.frontend``), and Silero VAD segmentation.

Usage:
    python bench/bench_long_audio.py                      # ConMamba-S front-end, 1 and 10 min
    python bench/bench_long_audio.py --minutes 1 10 60 --one-call-max 10 --threads 2
    python bench/bench_long_audio.py --config hparams/CTC/demo.yaml --chunk-frames 1000 3000

Peak MB: how much the call raises resident memory in a fresh process, inputs and modules
excluded (``long_audio.peak_memory``). Wall s: the same call in this process, best of
``--repeats``. The audio is noise: neither the front-end's nor the VAD's cost depends on what
is said (the VAD's is per 32 ms frame).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_time  # noqa: E402

from mamba_asr.long_audio import frontend, peak_memory  # noqa: E402
from mamba_asr.vad import speech_segments, vad_model  # noqa: E402
from modules.normalization import WindowedInputNormalization  # noqa: E402

RATE = 16000


def build(config: str, output_folder: str, minutes: float) -> tuple:
    """The configuration's Fbank, a WindowedInputNormalization, its CNN (eval) and ``minutes``
    of noise (1, samples)."""
    from hyperpyyaml import load_hyperpyyaml

    with open(config, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(
            f, {"data_folder": output_folder, "output_folder": output_folder}
        )
    torch.manual_seed(0)
    wav = torch.randn(1, int(minutes * 60 * RATE)) * 0.1
    return (hparams["compute_features"], WindowedInputNormalization(), hparams["CNN"].eval(),
            wav)


def chunked(parts: tuple, chunk_frames: int) -> None:
    frontend(*parts, chunk_frames=chunk_frames)


def one_call(parts: tuple) -> None:
    fbank, normalize, cnn, wav = parts
    with torch.no_grad():
        cnn(normalize(fbank(wav), torch.ones(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "hparams" / "CTC" / "conmamba_small.yaml"))
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--chunk-frames", type=int, nargs="+", default=[3000])
    parser.add_argument("--one-call-max", type=float, default=10.0,
                        help="longest recording (minutes) also run in one call")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (this process)")
    args = parser.parse_args()
    if min(args.minutes) <= 0 or min(args.chunk_frames) < 1 or args.repeats < 1:
        parser.error("--minutes, --chunk-frames and --repeats must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# {Path(args.config).name} front-end, {machine}, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}")
    print("\n| run | minutes | peak MB | wall s |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench_long_audio-") as scratch:
        for minutes in args.minutes:
            setup = functools.partial(build, args.config, scratch, minutes)
            parts = setup()
            runs = {f"chunked, {n} frames": functools.partial(chunked, chunk_frames=n)
                    for n in args.chunk_frames}
            if minutes <= args.one_call_max:
                runs["one call"] = one_call
            for name, call in runs.items():
                peak = peak_memory(call, setup)
                wall = best_time(functools.partial(call, parts), args.repeats, "cpu", False)
                print(f"| {name} | {minutes:g} | {peak / 1e6:.0f} | {wall:.2f} |", flush=True)
            vad_model()
            wav = parts[3][0]
            wall = best_time(functools.partial(speech_segments, wav, RATE, 30.0), args.repeats,
                             "cpu", False)
            print(f"| Silero VAD segments | {minutes:g} | - | {wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
