#!/usr/bin/env python3
"""Transcribe audio files with an exported model or a training run: text and word times.

Usage:
    python transcribe.py models/demo-ctc audio/*.flac talk.mp3 --output_format all --output_dir out/
    python transcribe.py results/demo/demo_S2S/7775 meeting.wav --beam_size 10 --no_lm
    find recordings -name '*.wav' | python transcribe.py models/demo-ctc - --output_dir out/
    python transcribe.py models/demo-ctc a.flac                  # JSON on standard output
    python transcribe.py models/demo-ctc a.flac --backend onnxruntime --int8   # no PyTorch

The model is an ``export.py`` folder (its checksums verified) or a run folder (its best
checkpoints, exported on the fly, nothing written). Inputs are audio files (whatever
libsndfile reads: wav, flac, ogg, mp3, ...; any rate and channel count), folders (their audio
files) and ``-`` (paths on standard input). Each input gets ``<output_dir>/<stem>.<format>``
(txt, json, srt, vtt, tsv, or all); without ``--output_dir`` the transcript goes to standard
output (JSON by default; several inputs: one JSON object per line, with its ``source``).
A file that cannot be read gets one ``error: <file>: <reason>`` line and the others are
transcribed; the exit status is then 1.

``--backend onnxruntime`` runs the folder's ONNX files (``export.py --format onnx``; CTC
and S2S models) with onnxruntime and NumPy: that process imports neither torch nor the model
code.
"""

from __future__ import annotations

import mamba_asr  # noqa: F401  (before speechbrain: drops its import-time torchvision notice)

# isort: split
import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mamba_asr import audio_files
from mamba_asr.command_line import ConfigError, run_main
from mamba_asr.model_card import CardError
from mamba_asr.transcribing import MAX_BATCH_SECONDS, MAX_PASS_SECONDS, SEARCHES
from mamba_asr.transcript import (
    ALL_FORMATS,
    FORMATS,
    Transcript,
    output_formats,
    render,
    verbose_json,
    write_transcripts,
)

BACKENDS = ("torch", "onnxruntime")

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("model", help="an export folder (export.py) or a training run folder")
    p.add_argument("inputs", nargs="+", help="audio files, folders, or - (paths on stdin)")
    p.add_argument("--output_format", "-f", default=None, choices=[*FORMATS, ALL_FORMATS],
                   help="default: all with --output_dir, json on standard output")
    p.add_argument("--output_dir", "-o", help="write <stem>.<format> files here")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="onnxruntime: the folder's ONNX files, without PyTorch (CPU)")
    p.add_argument("--int8", action="store_true",
                   help="onnxruntime: the int8 graphs (model, or encoder and decoder_step)")
    p.add_argument("--search", default="default", choices=SEARCHES,
                   help="CTC: greedy or (prefix) beam; default: the model's test search")
    p.add_argument("--beam_size", type=int, help="beam size (CTC beam or S2S search)")
    p.add_argument("--no_lm", nargs="?", const="True", default="False",
                   help="S2S: decode without the model's LM (also --no_lm True)")
    p.add_argument("--max_batch_seconds", type=float, default=MAX_BATCH_SECONDS,
                   help="seconds of (padded) audio per batch of short files")
    p.add_argument("--max_pass_seconds", type=float, default=MAX_PASS_SECONDS,
                   help="ConMamba CTC models: longest file transcribed in one pass")
    p.add_argument("--verbose", action="store_true",
                   help="print each transcript and its word times")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_transcriber(args: argparse.Namespace, no_lm: bool) -> Any:
    """The model of the command line on its backend; ConfigError for an option it cannot
    take."""
    options = {"search": args.search, "beam_size": args.beam_size,
               "max_batch_seconds": args.max_batch_seconds,
               "max_pass_seconds": args.max_pass_seconds}
    if args.backend == "onnxruntime":
        if args.device != "cpu":
            raise ConfigError(f"--backend onnxruntime runs on the CPU, not --device {args.device}")
        from mamba_asr.ort.transcriber import OnnxTranscriber

        return OnnxTranscriber.from_folder(args.model, quantized=args.int8, no_lm=no_lm,
                                           **options)
    if args.int8:
        raise ConfigError("--int8 is for --backend onnxruntime (model.int8.onnx)")
    from mamba_asr.transcriber import Transcriber

    return Transcriber.load(args.model, device=args.device, no_lm=no_lm, **options)


def _flag(name: str, value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ConfigError(f"--{name} takes True or False, not {value!r}")
    return value.lower() == "true"


def print_words(t: Transcript) -> None:
    """The transcript, then one line per word: start, end, probability, word."""
    print(f"{t.source} ({t.duration:.2f} s): {t.text}")
    for w in t.words:
        print(f"  {w.start:8.2f} {w.end:8.2f}  {w.probability:.2f}  {w.word}")


def main(argv: list[str]) -> int:
    """Transcribe; returns the exit status (1 when any input failed)."""
    args = _parser().parse_args(argv)
    no_lm = _flag("no_lm", args.no_lm)
    if args.max_batch_seconds <= 0 or args.max_pass_seconds <= 0:
        raise ConfigError("--max_batch_seconds and --max_pass_seconds must be positive")
    try:
        paths, missing = audio_files.expand_inputs(args.inputs, sys.stdin)
    except ValueError as exc:  # "-" without a standard input
        raise ConfigError(str(exc)) from exc
    for exc in missing:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    if not paths:
        raise ConfigError(f"no audio to transcribe ({len(missing)} input(s) failed)")
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is None:
        if args.output_format == ALL_FORMATS:
            raise ConfigError("--output_format all needs --output_dir")
        fmt = args.output_format or "json"
    else:
        fmt = args.output_format or ALL_FORMATS
        clashes = audio_files.duplicate_stems(paths)
        if clashes:
            stem, same = next(iter(clashes.items()))
            raise ConfigError(
                f"{len(clashes)} output name(s) would be written twice, e.g. {stem}.<format> for "
                + " and ".join(map(str, same)) + ": transcribe them in separate calls or rename"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
    output_formats(fmt)  # an unknown name fails here, before the model loads
    try:
        asr = load_transcriber(args, no_lm)
    except ValueError as exc:  # an option the model cannot take (--search greedy for S2S)
        if isinstance(exc, ConfigError | CardError):
            raise
        raise ConfigError(f"{args.model}: {exc}") from exc
    failed: list[Any] = list(missing)

    def report(item: Any, exc: Exception) -> None:
        failed.append(item)
        print(f"error: {exc}", file=sys.stderr, flush=True)

    progress = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=len(paths), unit="file", file=sys.stderr)
    for t in asr.transcribe(paths, on_error=report):
        if out_dir is not None:
            write_transcripts(t, fmt, out_dir, Path(t.source).stem)
        elif fmt == "json" and len(paths) > 1:  # JSON Lines, each object naming its input
            print(json.dumps({"source": t.source, **verbose_json(t)}, ensure_ascii=False))
        else:
            print(render(t, fmt), end="")
        if args.verbose:
            print_words(t)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.update(len(failed) - len(missing))
        progress.close()
    if failed:
        total = len(paths) + len(missing)
        print(f"error: {len(failed)} of {total} input(s) could not be transcribed",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if _parser().parse_known_args()[0].backend == "onnxruntime":
        run_main(main)  # without mamba_asr.config, which imports torch
    else:
        from mamba_asr.config import cli

        cli(main)
