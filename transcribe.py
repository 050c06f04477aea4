#!/usr/bin/env python3
"""Transcribe audio files with an exported model or a training run: text and word times.

Usage:
    python transcribe.py models/demo-ctc audio/*.flac talk.mp3 --output_format all --output_dir out/
    python transcribe.py results/demo/demo_S2S/7775 meeting.wav --beam_size 10 --no_lm
    find recordings -name '*.wav' | python transcribe.py models/demo-ctc - --output_dir out/
    python transcribe.py models/demo-ctc a.flac                  # JSON on standard output
    python transcribe.py models/demo-ctc a.flac --backend onnxruntime --int8   # no PyTorch
    python transcribe.py models/stream-ctc --stream talk.flac    # live: partials on stderr
    arecord -f S16_LE -r 16000 -c 1 -t raw | python transcribe.py models/stream-ctc --stream -

The model is an ``export.py`` folder (its checksums verified) or a run folder (its best
checkpoints, exported on the fly, nothing written). Inputs are audio files (whatever
libsndfile reads: wav, flac, ogg, mp3, ...; any rate and channel count), folders (their audio
files) and ``-`` (paths on standard input). Each input gets ``<output_dir>/<stem>.<format>``
(txt, json, srt, vtt, tsv, or all); without ``--output_dir`` the transcript goes to standard
output (JSON by default; several inputs: one JSON object per line, with its ``source``).
A file that cannot be read gets one ``error: <file>: <reason>`` line and the others are
transcribed; the exit status is then 1.

``--stream FILE`` transcribes one file as live audio with a streaming model
(``hparams/CTC/conmamba_streaming_*.yaml``): ``--chunk_ms`` at a time, paced to real time
(``--stream_speed``), printing on standard error each change of the hypothesis with its
stream time, then the final transcript as above; ``--stream -`` reads raw 16-kHz 16-bit
little-endian mono PCM from standard input (a plain ``-`` still reads paths).

``--backend onnxruntime`` runs the folder's ONNX files (``export.py --format onnx``; CTC
and S2S models) with onnxruntime and NumPy: that process imports neither torch nor the model
code.
"""

from __future__ import annotations

import mamba_asr  # noqa: F401  (before speechbrain: drops its import-time torchvision notice)

# isort: split
import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, TextIO

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
    p.add_argument("inputs", nargs="*", help="audio files, folders, or - (paths on stdin)")
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
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (--stream: no progress lines)")
    g = p.add_argument_group(
        "streaming", "A streaming model (hparams/CTC/conmamba_streaming_*.yaml) transcribes "
        "live audio chunk by chunk. Progress goes to standard error, one line per change: "
        "'<stream time> s  <words now final>' and '<stream time> s  \u2026 <partial tail>' "
        "(not yet final); standard output gets only the final transcript, in --output_format "
        "as without --stream (or --output_dir/<stem>.<format>; stdin.<format> for -).")
    g.add_argument("--stream", metavar="FILE|-",
                   help="transcribe FILE (any format and rate, as without --stream) as if it "
                   "were live, or - : raw 16-kHz 16-bit little-endian mono PCM read from "
                   "standard input until EOF (Ctrl-C: end the input and transcribe it)")
    g.add_argument("--chunk_ms", type=float, default=160.0,
                   help="milliseconds of audio fed to the model at a time (default: 160)")
    g.add_argument("--stream_speed", type=float, default=1.0,
                   help="FILE: feed it at this many times real time (default: 1; 0: without "
                   "waiting); standard input is read as fast as it comes")
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


def _output(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The output format and folder (created) of the command line; ConfigError for a wrong
    pair or an unknown format."""
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is None:
        if args.output_format == ALL_FORMATS:
            raise ConfigError("--output_format all needs --output_dir")
        fmt = args.output_format or "json"
    else:
        fmt = args.output_format or ALL_FORMATS
    output_formats(fmt)  # an unknown name fails here, before the model loads
    return fmt, out_dir


def _load(args: argparse.Namespace, no_lm: bool) -> Any:
    """:func:`load_transcriber`, an option the model cannot take as a ConfigError."""
    try:
        return load_transcriber(args, no_lm)
    except ValueError as exc:  # an option the model cannot take (--search greedy for S2S)
        if isinstance(exc, ConfigError | CardError):
            raise
        raise ConfigError(f"{args.model}: {exc}") from exc


def main(argv: list[str]) -> int:
    """Transcribe; returns the exit status (1 when any input failed)."""
    args = _parser().parse_args(argv)
    no_lm = _flag("no_lm", args.no_lm)
    if args.max_batch_seconds <= 0 or args.max_pass_seconds <= 0:
        raise ConfigError("--max_batch_seconds and --max_pass_seconds must be positive")
    if args.stream is not None:
        return stream_main(args, no_lm)
    if not args.inputs:
        raise ConfigError("no inputs: give audio files, folders or - (paths on standard "
                          "input), or --stream FILE")
    try:
        paths, missing = audio_files.expand_inputs(args.inputs, sys.stdin)
    except ValueError as exc:  # "-" without a standard input
        raise ConfigError(str(exc)) from exc
    for exc in missing:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    if not paths:
        raise ConfigError(f"no audio to transcribe ({len(missing)} input(s) failed)")
    fmt, out_dir = _output(args)
    if out_dir is not None:
        clashes = audio_files.duplicate_stems(paths)
        if clashes:
            stem, same = next(iter(clashes.items()))
            raise ConfigError(
                f"{len(clashes)} output name(s) would be written twice, e.g. {stem}.<format> for "
                + " and ".join(map(str, same)) + ": transcribe them in separate calls or rename"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
    asr = _load(args, no_lm)
    failed: list[Any] = list(missing)

    def report(item: Any, exc: Exception) -> None:
        failed.append(item)
        print(f"error: {exc}", file=sys.stderr, flush=True)

    progress = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=len(paths), unit="file", file=sys.stderr)
    for t in asr.transcribe(paths, on_error=report):
        _emit(t, fmt, out_dir, len(paths) > 1, args.verbose)
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


def _emit(t: Transcript, fmt: str, out_dir: Path | None, several: bool, verbose: bool,
          stem: str | None = None) -> None:
    """Write ``t`` to ``out_dir`` (``<stem>.<format>``) or print it."""
    if out_dir is not None:
        write_transcripts(t, fmt, out_dir, stem or Path(t.source).stem)
    elif fmt == "json" and several:  # JSON Lines, each object naming its input
        print(json.dumps({"source": t.source, **verbose_json(t)}, ensure_ascii=False))
    else:
        print(render(t, fmt), end="")
    if verbose:
        print_words(t)


# ---------------------------------------------------------------------- --stream


class StreamPrinter:
    """The progress lines of ``--stream`` on ``out``: ``<stream time> s  <words now final>``
    and ``<stream time> s  … <partial tail>`` whenever it changed."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.partial = ""
        self.shown = 0  # final words printed

    def _line(self, seconds: float, text: str) -> None:
        if self.out is not None:
            print(f"{seconds:6.2f} s  {text}", file=self.out, flush=True)

    def update(self, update: Any) -> None:
        """Print what a ``StreamUpdate`` changed."""
        if update.words:
            self.shown += len(update.words)
            self._line(update.seconds, " ".join(w.word for w in update.words))
        if update.partial != self.partial:
            self.partial = update.partial
            if update.partial:
                self._line(update.seconds, f"\u2026 {update.partial}")

    def finish(self, t: Transcript) -> None:
        """The words that only the end of the stream made final."""
        rest = t.words[self.shown:]
        if rest:
            self._line(t.duration, " ".join(w.word for w in rest))


def paced(wav: Any, chunk: int, rate: int, speed: float) -> Iterator[Any]:
    """``wav`` in chunks of ``chunk`` samples, each once its last sample would have been
    recorded (at ``speed`` times real time; 0: at once)."""
    start = time.monotonic()
    for a in range(0, len(wav), chunk):
        b = min(a + chunk, len(wav))
        if speed > 0:
            delay = start + b / rate / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield wav[a:b]


class PcmReader:
    """Raw 16-bit little-endian mono PCM from a binary file, ``chunk`` samples at a time as
    float32 arrays (``mamba_asr.streaming.pcm16_to_float``), until EOF. ``size`` counts the
    bytes read; ``odd`` tells whether the input ended inside a sample (that byte dropped)."""

    def __init__(self, f: BinaryIO, chunk: int) -> None:
        self.f, self.chunk_bytes = f, 2 * chunk
        self.size = 0
        self.odd = False

    def __iter__(self) -> Iterator[Any]:
        from mamba_asr.streaming import pcm16_to_float

        carry = b""
        while data := self.f.read(self.chunk_bytes):
            self.size += len(data)
            data, carry = carry + data, b""
            if len(data) % 2:  # a short read may end inside a sample: completed next time
                data, carry = data[:-1], data[-1:]
            if data:
                yield pcm16_to_float(data)
        self.odd = bool(carry)


@contextlib.contextmanager
def interrupt_ends_input() -> Iterator[Callable[[], bool]]:
    """While inside: the first Ctrl-C only asks the input to end (the yielded function turns
    true), so that what was heard is still transcribed; a second one interrupts."""
    asked = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal asked
        if asked:
            raise KeyboardInterrupt
        asked = True

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: asked
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_main(args: argparse.Namespace, no_lm: bool) -> int:
    """``--stream``: feed a file (paced) or standard input's PCM to the model's
    ``Transcriber.stream()``, print progress on stderr, then the final transcript."""
    if args.inputs:
        raise ConfigError("--stream reads its own audio (a file, or - for PCM on standard "
                          f"input): give no other inputs ({' '.join(args.inputs)})")
    if args.backend != "torch":
        raise ConfigError(f"--stream runs on the torch backend, not --backend {args.backend}")
    if not args.chunk_ms > 0 or not args.stream_speed >= 0:
        raise ConfigError("--chunk_ms must be positive and --stream_speed 0 or more")
    from_stdin = args.stream == "-"
    if from_stdin and sys.stdin.isatty():
        raise ConfigError("--stream -: standard input is a terminal; pipe raw 16-kHz 16-bit "
                          "little-endian mono PCM into it (arecord -f S16_LE -r 16000 -c 1 "
                          "-t raw | ...)")
    fmt, out_dir = _output(args)
    from mamba_asr import audio_io

    asr = _load(args, no_lm)
    try:
        stream = asr.stream()
    except ValueError as exc:  # not a streaming model
        raise ConfigError(f"{args.model}: {exc}") from exc
    rate = stream.sample_rate
    chunk = max(1, round(args.chunk_ms * rate / 1000))
    reader = None
    if from_stdin:
        source, stem = "<stdin>", "stdin"
        reader = PcmReader(sys.stdin.buffer, chunk)
        chunks: Iterable[Any] = reader
    else:
        source, stem = args.stream, Path(args.stream).stem
        try:  # any format and rate, resampled as without --stream
            wav = audio_io.load_audio(args.stream, rate)
        except audio_files.AudioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        chunks = paced(wav, chunk, rate, args.stream_speed)
    printer = StreamPrinter(None if args.quiet else sys.stderr)
    spent = 0.0
    with interrupt_ends_input() as interrupted:
        for samples in chunks:
            start = time.perf_counter()
            update = stream.feed(samples)
            spent += time.perf_counter() - start
            printer.update(update)
            if interrupted():
                print("interrupted: transcribing the audio so far", file=sys.stderr)
                break
    if reader is not None and reader.size < 2:
        print(f"error: {source}: no audio (raw 16-bit PCM, {reader.size} bytes)",
              file=sys.stderr)
        return 1
    start = time.perf_counter()
    t = stream.finish()
    spent += time.perf_counter() - start
    printer.finish(t)
    rtf = spent / t.duration if t.duration else 0.0
    t = replace(t, source=source, timings={"transcribe": spent, "real_time_factor": rtf})
    status = 130 if interrupted() else 0
    if reader is not None and reader.odd:
        print(f"error: {source}: {reader.size} bytes is not a whole number of 16-bit samples "
              "(the input ended inside a sample; its last byte was dropped)", file=sys.stderr)
        status = 1
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    _emit(t, fmt, out_dir, False, args.verbose, stem)
    return status


if __name__ == "__main__":
    if _parser().parse_known_args()[0].backend == "onnxruntime":
        run_main(main)  # without mamba_asr.config, which imports torch
    else:
        from mamba_asr.config import cli

        cli(main)
