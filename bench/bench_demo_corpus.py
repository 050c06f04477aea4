#!/usr/bin/env python3
"""Benchmark the demo corpus tool: a build from scratch, and the second run that finds it done.

Usage:
    python bench/bench_demo_corpus.py                              # tiny preset, 2 workers
    python bench/bench_demo_corpus.py --preset demo --workers 1 2 --builds 1

Each build goes into a fresh temporary folder (``--builds`` of them per worker count; the
verification against the committed checksums is part of a build). On the last build's folder:
``build`` again in this process (finds the stamp: nothing synthesised), the command line again
(``python -m mamba_asr.demo_corpus``: interpreter start-up and imports included) and
``verify`` (re-hashes every file), each the best of ``--repeats`` after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_time  # noqa: E402

from mamba_asr.demo_corpus import corpus  # noqa: E402


def time_builds(preset: str, workers: int, builds: int, scratch: Path) -> tuple[list[float], Path]:
    """Wall seconds of ``builds`` builds from scratch, and the last build's folder."""
    walls = []
    for k in range(builds):
        out = scratch / f"w{workers}-{k}"
        start = time.perf_counter()
        info = corpus.build(out, preset, workers=workers)
        walls.append(time.perf_counter() - start)
        if info.get("already_present"):
            raise RuntimeError(f"{out} held a corpus already: not a build from scratch")
    return walls, out


def time_second_runs(preset: str, out: Path, repeats: int) -> dict[str, float]:
    """Best wall seconds of the runs that find the corpus in ``out`` complete."""
    cli = [sys.executable, "-m", "mamba_asr.demo_corpus", "--out", str(out), "--preset", preset]

    def in_process() -> None:
        if not corpus.build(out, preset).get("already_present"):
            raise RuntimeError(f"the second build in {out} synthesised again")

    def command_line() -> None:
        proc = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or "already present" not in proc.stdout:
            raise RuntimeError(f"{' '.join(cli)} failed:\n{proc.stdout}\n{proc.stderr}")

    def verify() -> None:
        problems = corpus.verify(out, preset)
        if problems:
            raise RuntimeError(f"verify found {len(problems)} problem(s): {problems[:3]}")

    runs = {"second build (in process)": in_process,
            "second run (command line)": command_line,
            "verify (re-hash every file)": verify}
    return {name: best_time(fn, repeats, "cpu") for name, fn in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(corpus.PRESETS), default="tiny")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--builds", type=int, default=3, help="builds per worker count")
    parser.add_argument("--repeats", type=int, default=5, help="timed second runs")
    args = parser.parse_args()
    if min(args.workers) < 1 or args.builds < 1 or args.repeats < 1:
        parser.error(f"--workers, --builds and --repeats must be >= 1; got {args.workers}, "
                     f"{args.builds} and {args.repeats}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# demo corpus, preset {args.preset}, {machine}, Python {platform.python_version()}")
    print("\n| run | workers | wall s (best) | wall s (median) | runs |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench_demo_corpus-") as scratch:
        out = None
        for workers in args.workers:
            walls, out = time_builds(args.preset, workers, args.builds, Path(scratch))
            print(f"| build from scratch | {workers} | {min(walls):.2f} | "
                  f"{statistics.median(walls):.2f} | {len(walls)} |", flush=True)
        for name, best in time_second_runs(args.preset, out, args.repeats).items():
            print(f"| {name} | - | {best:.3f} | - | {args.repeats} |", flush=True)


if __name__ == "__main__":
    main()
