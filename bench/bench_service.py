#!/usr/bin/env python3
"""Benchmark the transcription service (serve.py): throughput, latency, batching and memory.

Usage:
    python bench/bench_service.py                         # models/demo-ctc, concurrency 1 4 16
    python bench/bench_service.py --quick                 # a smoke run: a few requests a level
    python bench/bench_service.py --concurrency 16 --leak_requests 0

``serve.py`` runs as a subprocess on 127.0.0.1 (a free port), once with batching (its defaults,
``--max_wait_ms 20 --max_batch_seconds 60``, or this script's options of the same names) and
once with ``--no_batching``; a third server, batching on, takes the leak check. Each is
started, waited for (``/ready``), loaded, and stopped with SIGTERM (it must drain and exit 0).
All traffic stays on loopback. The server keeps torch's default threads (one per core); the
load generator (``httpx.AsyncClient``, this process) shares the same cores.

At each concurrency N, N workers send 5.0-s FLAC clips (demo test-clean utterances end to end,
cut to exactly 5.0 s; several clips in turn) as OpenAI transcription requests, one at a time
each: first a few warm-up requests, then ``--requests`` x N (at most ``--max_requests``, and
for at most ``--level_seconds``). Latency is the client's, request sent to response read.
From the server's ``/metrics`` (deltas over the measured requests): the mean batch size and
the mean forward pass (the model's whole transcription of a batch). Peak RSS is the server's
VmRSS sampled every 50 ms during the level (Linux ``/proc``); the mode's line gives VmHWM, the
process' peak over its life (model loading included).

The p95 bound with batching, per concurrency N: ``max_wait_ms`` + one full batch, the mean
forward pass scaled to N requests (mean pass x N / mean batch size) + the request's fixed cost
outside the model (upload, decoding, HTTP: the c=1 mean latency minus its mean forward pass
and its ``max_wait_ms`` wait, as batching on measured it).

Leak check: a fresh batching server takes ``--leak_warmup`` (2,000) then ``--leak_requests``
(2,000) requests in one stream at concurrency ``--leak_concurrency`` (16), VmRSS sampled every
20 requests. The warm-up is there because glibc's dynamic mmap threshold keeps freed large
buffers in the heap: RSS rises in steps over the first 1,000-2,000 requests, then stays flat.
Reported: RSS after the first 10 % (200) of the measured requests vs at the end, and the
least-squares trend between them (the verdict, tolerance ``LEAK_TOLERANCE_MB``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mamba_asr.serving.metrics import BATCH_BUCKETS  # noqa: E402

RATE = 16000
CLIP_SECONDS = 5.0
CLIPS = 8
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0
RSS_INTERVAL_S = 0.05
LEAK_SAMPLE_EVERY = 20  # requests between RSS samples in the leak check
LEAK_WINDOW = 5  # samples averaged for the RSS "after the first 10 %" and "at the end"
# Over the 1,800 requests after the first 10 %: 20 MB is 11 KB a request. Keeping an upload
# (a 5-s FLAC, ~0.1 MB), its waveform (0.3 MB) or a batch's features per request adds 150 MB
# or more; a sample lands in or between passes at random (+-10 MB), the fitted trend over ~90
# samples is good to a few MB.
LEAK_TOLERANCE_MB = 20.0


def modes(args: argparse.Namespace) -> dict[str, list[str]]:
    """serve.py's options in each mode."""
    return {"batching on": ["--max_wait_ms", f"{args.max_wait_ms:g}", "--max_batch_seconds",
                            f"{args.max_batch_seconds:g}"],
            "batching off": ["--no_batching"]}


# --------------------------------------------------------------------------- inputs


def make_clips(folder: Path, count: int) -> list[bytes]:
    """``count`` 16-bit FLAC clips of exactly ``CLIP_SECONDS``: demo test-clean utterances end
    to end, cut in turn; written to ``folder``, returned as bytes."""
    import soundfile

    from mamba_asr import audio_io

    files = sorted((REPO / "data" / "demo" / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))
    if not files:
        sys.exit(f"no demo corpus at {REPO / 'data' / 'demo'}: run `make corpus` first")
    need, pieces, total = int(CLIP_SECONDS * RATE), [], 0
    while total < count * need:
        wav = audio_io.load_audio(files[len(pieces) % len(files)], RATE).numpy()
        pieces.append(wav)
        total += len(wav)
    speech = np.concatenate(pieces)
    clips = []
    for i in range(count):
        path = folder / f"clip{i}.flac"
        soundfile.write(path, speech[i * need:(i + 1) * need], RATE, subtype="PCM_16",
                        format="FLAC")
        assert soundfile.info(path).frames == need, path
        clips.append(path.read_bytes())
    return clips


def model_folder(model: str, tmp: Path) -> tuple[Path, str, str]:
    """The export folder to serve, the model's name and a line saying what it is; a
    random-weight export of the demo configuration when ``model`` does not exist."""
    from mamba_asr.model_card import CARD_FILE, read_card

    path = Path(model)
    if (path / CARD_FILE).is_file():
        card = read_card(path)
        return (path.resolve(), card["name"],
                f"{model} ({card['name']}: {card.get('architecture')})")
    if path.exists():
        sys.exit(f"--model {model}: not an export folder (no {CARD_FILE}); give the folder "
                 "export.py wrote, e.g. models/demo-ctc after `make demo`")
    from mamba_asr.export import export_untrained

    out = tmp / "demo-ctc"
    export_untrained(str(REPO / "hparams" / "CTC" / "demo.yaml"), out)
    return out, read_card(out)["name"], (
        f"{model} not found: a random-weight export of hparams/CTC/demo.yaml (the same "
        "network; transcripts meaningless, so decoding costs differ)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the server


def proc_status(pid: int, key: str) -> int | None:
    """A number in a process' /proc status (``VmRSS``/``VmHWM`` in kB, ``Threads``); None
    where there is none (not Linux, the process gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_status_mb(pid: int, key: str) -> float | None:
    kb = proc_status(pid, key)
    return None if kb is None else kb / 1024


@dataclass
class Server:
    """A ``serve.py`` subprocess on 127.0.0.1."""

    proc: subprocess.Popen
    url: str
    log: Path
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float | None:
        return proc_status_mb(self.pid, "VmRSS")

    def metrics(self) -> dict[str, float]:
        """The server's metric samples by name (labels summed), and histogram buckets as
        ``name{le}`` (e.g. ``mamba_asr_batch_size_bucket{4.0}``)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
                if "le" in sample.labels:
                    values[f"{sample.name}{{{sample.labels['le']}}}"] = sample.value
        return values


@contextlib.contextmanager
def serving(model: Path, options: list[str], tmp: Path) -> Iterator[Server]:
    """Start ``serve.py`` with ``options``, wait for /ready, yield it; SIGTERM on exit (the
    exit status is kept in ``Server.exit_code``)."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    cmd = [sys.executable, str(REPO / "serve.py"), "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--log_level", "warning", *options]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {proc.returncode}" if proc.poll() is not None
                       else f"not ready within {READY_TIMEOUT_S:.0f} s")
                sys.exit(f"serve.py {' '.join(options)} {why}:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.exit_code = proc.returncode


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    """What the client saw over one run of requests."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    # (requests done, RSS MB, threads) every ``sample_every`` requests
    rss_series: list[tuple[int, float, int]] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.latencies) + len(self.errors)

    def percentile_ms(self, q: float) -> float:
        return 1000 * float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


async def _load(server: Server, model_name: str, clips: list[bytes], concurrency: int,
                requests: int, time_limit: float, sample_every: int = 0) -> Load:
    """``requests`` transcriptions by ``concurrency`` workers (stopping after ``time_limit``
    s); the server's RSS sampled all along, and every ``sample_every`` requests when > 0."""
    load = Load()
    issued = 0
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    url = f"{server.url}/v1/audio/transcriptions"
    data = {"model": model_name, "response_format": "json"}

    async def sample_rss() -> None:
        while not stop.is_set():
            rss = server.rss_mb()
            if rss is not None:
                load.peak_rss_mb = max(load.peak_rss_mb or 0.0, rss)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RSS_INTERVAL_S)

    async def worker(client: httpx.AsyncClient, deadline: float) -> None:
        nonlocal issued
        while issued < requests and time.monotonic() < deadline:
            i = issued
            issued += 1
            files = {"file": (f"clip{i % len(clips)}.flac", clips[i % len(clips)], "audio/flac")}
            start = time.perf_counter()
            try:
                response = await client.post(url, files=files, data=data)
                elapsed = time.perf_counter() - start
                if response.status_code != 200 or "text" not in response.json():
                    load.errors.append(f"{response.status_code} {response.text[:200]}")
                else:
                    load.latencies.append(elapsed)
            except (httpx.HTTPError, ValueError) as exc:  # ValueError: a body that is not JSON
                load.errors.append(f"{type(exc).__name__}: {exc}")
            if sample_every and load.done % sample_every == 0:
                rss = server.rss_mb()
                if rss is not None:
                    threads = proc_status(server.pid, "Threads") or 0
                    load.rss_series.append((load.done, rss, threads))

    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        sampler = asyncio.create_task(sample_rss())
        start = time.perf_counter()
        deadline = time.monotonic() + time_limit
        await asyncio.gather(*(worker(client, deadline) for _ in range(concurrency)))
        load.seconds = time.perf_counter() - start
        stop.set()
        await sampler
    return load


def run_load(*args, **kwargs) -> Load:
    return asyncio.run(_load(*args, **kwargs))


@dataclass
class Level:
    """One mode at one concurrency."""

    mode: str
    concurrency: int
    load: Load
    batches: float  # forward passes (metrics delta)
    batch_size_sum: float
    forward_seconds: float  # model time summed over the passes
    passes_by_size: dict[str, float]  # forward passes by requests in them ("3-4": passes)

    @property
    def throughput(self) -> float:
        return len(self.load.latencies) / self.load.seconds if self.load.seconds else 0.0

    @property
    def mean_batch(self) -> float:
        return self.batch_size_sum / self.batches if self.batches else float("nan")

    @property
    def mean_pass_s(self) -> float:
        return self.forward_seconds / self.batches if self.batches else float("nan")


def measure(server: Server, mode: str, model_name: str, clips: list[bytes], concurrency: int,
            args: argparse.Namespace) -> Level:
    requests = min(args.requests * concurrency, args.max_requests)
    run_load(server, model_name, clips, concurrency, args.warmup * concurrency,
             args.level_seconds)
    before = server.metrics()
    load = run_load(server, model_name, clips, concurrency, requests, args.level_seconds)
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    by_size, below, low = {}, 0.0, 1
    for le in BATCH_BUCKETS:
        upto = delta(f"mamba_asr_batch_size_bucket{{{float(le)}}}")
        by_size[str(le) if le == low else f"{low}-{le}"] = upto - below
        below, low = upto, le + 1
    # every clip is CLIP_SECONDS long: a pass's real-time factor, summed over its requests,
    # is its seconds / CLIP_SECONDS
    level = Level(mode, concurrency, load, delta("mamba_asr_batch_size_count"),
                  delta("mamba_asr_batch_size_sum"),
                  delta("mamba_asr_real_time_factor_sum") * CLIP_SECONDS, by_size)
    print(f"{mode}, c={concurrency}: {len(load.latencies)} ok, {len(load.errors)} errors, "
          f"{level.throughput:.2f} req/s, p95 {load.percentile_ms(95):.0f} ms, "
          f"mean batch {level.mean_batch:.2f}", file=sys.stderr, flush=True)
    return level


# --------------------------------------------------------------------------- report


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def print_table(levels: list[Level], peaks: dict[str, float | None]) -> None:
    print("| mode | concurrency | requests | errors | req/s | p50 ms | p95 ms | p99 ms | "
          "mean batch | mean pass ms | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        ld = lv.load
        print(f"| {lv.mode} | {lv.concurrency} | {ld.done} | {len(ld.errors)} | "
              f"{lv.throughput:.2f} | {ld.percentile_ms(50):.0f} | {ld.percentile_ms(95):.0f} | "
              f"{ld.percentile_ms(99):.0f} | {lv.mean_batch:.2f} | {1000 * lv.mean_pass_s:.0f} | "
              f"{_mb(ld.peak_rss_mb)} |")
    print()
    for mode, peak in peaks.items():
        print(f"- {mode}: server peak RSS over its life (VmHWM) {_mb(peak)} MB")


def print_ratios(levels: list[Level]) -> None:
    on = {lv.concurrency: lv for lv in levels if lv.mode == "batching on"}
    off = {lv.concurrency: lv for lv in levels if lv.mode == "batching off"}
    for c in sorted(on.keys() & off.keys()):
        ratio = on[c].throughput / off[c].throughput if off[c].throughput else float("nan")
        goal = "; goal >= 1.5x: " + ("met" if ratio >= 1.5 else "missed") if c == 16 else ""
        print(f"- throughput batching on / off at concurrency {c}: {ratio:.2f}x{goal}")


def print_bounds(levels: list[Level], max_wait_ms: float) -> None:
    on = {lv.concurrency: lv for lv in levels if lv.mode == "batching on"}
    if 1 not in on:
        print("- p95 bound: needs concurrency 1 with batching (the request's fixed cost)")
        return
    one = on[1]
    overhead = float(np.mean(one.load.latencies)) - one.mean_pass_s - max_wait_ms / 1000
    print(f"- request cost outside the model (c=1 mean latency - mean pass - max_wait): "
          f"{1000 * overhead:.0f} ms")
    for c, lv in sorted(on.items()):
        full = lv.mean_pass_s * c / lv.mean_batch
        bound = max_wait_ms / 1000 + full + overhead
        p95 = lv.load.percentile_ms(95) / 1000
        verdict = "within" if p95 <= bound else "over"
        sizes = ", ".join(f"{k}: {v:.0f}" for k, v in lv.passes_by_size.items() if v)
        print(f"- p95 bound at concurrency {c}: {max_wait_ms:g} ms wait + {1000 * full:.0f} ms "
              f"full batch of {c} + {1000 * overhead:.0f} ms = {1000 * bound:.0f} ms; "
              f"p50 {lv.load.percentile_ms(50):.0f} ms, p95 {1000 * p95:.0f} ms: {verdict} "
              f"({100 * (p95 / bound - 1):+.0f} %); passes by requests in them: {sizes}")


def run_levels(model: Path, model_name: str, clips: list[bytes], tmp: Path,
           args: argparse.Namespace) -> int:
    """Every concurrency in both modes, one server per mode; the table. Exit status."""
    done: list[Level] = []
    peaks: dict[str, float | None] = {}
    status = 0
    for mode, options in modes(args).items():
        with serving(model, options, tmp) as server:
            for c in args.concurrency:
                done.append(measure(server, mode, model_name, clips, c, args))
            peaks[mode] = proc_status_mb(server.pid, "VmHWM")
        if server.exit_code != 0:
            print(f"serve.py ({mode}) exited {server.exit_code} on SIGTERM, not 0:\n"
                  f"{server.log.read_text()[-2000:]}", file=sys.stderr)
            status = 1
    print()
    print_table(done, peaks)
    print_ratios(done)
    print_bounds(done, args.max_wait_ms)
    for lv in done:
        for error in sorted(set(lv.load.errors))[:3]:
            print(f"- error ({lv.mode}, c={lv.concurrency}): {error}")
            status = 1
    return status


def leak_check(model: Path, model_name: str, clips: list[bytes], tmp: Path,
               args: argparse.Namespace) -> int:
    """``--leak_warmup`` then ``--leak_requests`` requests in one stream to a fresh batching
    server, its RSS sampled every ``LEAK_SAMPLE_EVERY``: the growth after the warm-up and
    the first 10 %, and the trend. Exit status."""
    total = args.leak_warmup + args.leak_requests
    with serving(model, modes(args)["batching on"], tmp) as server:
        load = run_load(server, model_name, clips, args.leak_concurrency, total,
                        args.leak_seconds, sample_every=LEAK_SAMPLE_EVERY)
    print(f"\nLeak check: {args.leak_warmup} warm-up + {args.leak_requests} requests at "
          f"concurrency {args.leak_concurrency}, batching on, {load.done} done, "
          f"{len(load.errors)} errors, {load.seconds:.0f} s; server exit {server.exit_code}")
    failed = bool(load.errors) or load.done < total or server.exit_code != 0
    series = [(n - args.leak_warmup, mb) for n, mb, _ in load.rss_series]
    warm = [mb for n, mb in series if n <= 0]
    measured = [(n, mb) for n, mb in series if n >= args.leak_requests * 0.1]
    if len(measured) < 2 * LEAK_WINDOW:
        print("- too few RSS samples for a verdict (needs Linux /proc and more requests)")
        return int(failed)
    first, last = measured[:LEAK_WINDOW], measured[-LEAK_WINDOW:]
    start, end = float(np.mean([mb for _, mb in first])), float(np.mean([mb for _, mb in last]))
    counts, mbs = zip(*measured, strict=True)
    trend = float(np.polyfit(counts, mbs, 1)[0]) * (counts[-1] - counts[0])
    verdict = "no growth" if trend < LEAK_TOLERANCE_MB else "GROWTH"
    if warm:
        print(f"- warm-up: RSS {warm[0]:,.0f} MB after {LEAK_SAMPLE_EVERY} requests, "
              f"{warm[-1]:,.0f} MB after {args.leak_warmup}")
    print(f"- then RSS after {first[0][0]}-{first[-1][0]} requests {start:,.0f} MB, after "
          f"{last[0][0]}-{last[-1][0]} {end:,.0f} MB (means of {LEAK_WINDOW} samples): "
          f"{end - start:+.1f} MB")
    print(f"- least-squares trend from {counts[0]} to {counts[-1]} requests: {trend:+.1f} MB "
          f"({1000 * trend / (counts[-1] - counts[0]):+.1f} MB per 1,000 requests; samples "
          f"{min(mbs):,.0f}-{max(mbs):,.0f} MB): {verdict} (tolerance {LEAK_TOLERANCE_MB:g} MB)")
    step = max(1, len(load.rss_series) // 20)
    print("- sampled (requests from the start, warm-up included: MB, threads): "
          + ", ".join(f"{n}: {mb:.0f} ({t})" for n, mb, t in load.rss_series[step - 1::step]))
    return int(failed or verdict != "no growth")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/demo-ctc",
                        help="an export folder (missing: a random-weight demo export)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16],
                        help="levels (none: only the leak check)")
    parser.add_argument("--requests", type=int, default=40, help="measured requests per worker")
    parser.add_argument("--max_requests", type=int, default=640, help="at most, per level")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up requests per worker")
    parser.add_argument("--level_seconds", type=float, default=300.0,
                        help="time bound of one level's measured requests")
    parser.add_argument("--max_wait_ms", type=float, default=20.0, help="serve.py's, batching on")
    parser.add_argument("--max_batch_seconds", type=float, default=60.0,
                        help="serve.py's, batching on")
    parser.add_argument("--leak_requests", type=int, default=2000, help="0: no leak check")
    parser.add_argument("--leak_warmup", type=int, default=2000,
                        help="requests before the leak check's (the allocator's warm-up)")
    parser.add_argument("--leak_concurrency", type=int, default=16, help="workers, leak check")
    parser.add_argument("--leak_seconds", type=float, default=900.0,
                        help="time bound of the leak check's requests")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 requests per worker, concurrency 1 4, a leak check "
                        "of 100 + 300 requests")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup, args.concurrency = 3, 1, [1, 4]
        args.leak_requests = min(args.leak_requests, 300)
        args.leak_warmup, args.leak_concurrency = min(args.leak_warmup, 100), 4
    if (min(args.concurrency, default=1) < 1 or args.requests < 1 or args.warmup < 0
            or args.leak_requests < 0 or args.leak_warmup < 0):
        parser.error("--concurrency and --requests must be positive, --warmup, "
                     "--leak_requests and --leak_warmup 0 or more")

    import torch

    status = 0
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmpdir:
        tmp = Path(tmpdir)
        model, model_name, note = model_folder(args.model, tmp)
        clips = make_clips(tmp, CLIPS)
        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared "
                   f"by server and client, torch {torch.__version__} with "
                   f"{torch.get_num_threads()} intra-op threads (its default here)")
        print(f"\n# serve.py on 127.0.0.1, {CLIPS} clips of {CLIP_SECONDS:g} s (16-bit FLAC, "
              f"demo test-clean), {machine}")
        print(f"# model: {note}; batching on = {' '.join(modes(args)['batching on'])}")
        if args.concurrency:
            status |= run_levels(model, model_name, clips, tmp, args)
        if args.leak_requests:
            status |= leak_check(model, model_name, clips, tmp, args)
    return status


if __name__ == "__main__":
    sys.exit(main())
