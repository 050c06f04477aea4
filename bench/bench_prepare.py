#!/usr/bin/env python3
"""Benchmark our LibriSpeech manifest preparation against lhotse's ``prepare_librispeech``.

Usage:
    python bench/bench_prepare.py                        # full size (292,367 utterances)
    python bench/bench_prepare.py --scale 0.05 --repeats 3
    python bench/bench_prepare.py --splits dev-clean test-clean --keep-tree
    python bench/bench_prepare.py --tree /tmp/ls_tree    # build once, reuse afterwards

Needs ``pip install -r requirements-bench.txt`` (lhotse). A LibriSpeech-shaped tree is
built (or reused with ``--tree``): every split at its real utterance count, speakers with
chapters of about 100-120 utterances, one ``*.trans.txt`` per chapter, and audio files that
are hard links to a pool of a few hundred distinct 16 kHz mono FLAC files of 0.2-2 s. After
warming the file cache, each tool runs as a separate process over the same splits with two
workers; wall time is measured from here and CPU time from the children's rusage. Both
outputs are checked (row counts, IDs, durations of sampled rows against the FLAC headers).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
SAMPLE_RATE = 16000
SPLIT_SIZES = {
    "train-clean-100": 28_539,
    "train-clean-360": 104_014,
    "train-other-500": 148_688,
    "dev-clean": 2_703,
    "dev-other": 2_864,
    "test-clean": 2_620,
    "test-other": 2_939,
}
TRAIN = ("train-clean-100", "train-clean-360", "train-other-500")
DEV = ("dev-clean", "dev-other")
TEST = ("test-clean", "test-other")
MARKER = "bench_tree.json"
GOAL_SPEEDUP = 5.0
GOAL_WALL_S = 60.0
VOCAB = (
    "THE AND OF TO A IN HE I THAT WAS IT HIS HAD YOU WITH AS FOR HER SHE NOT BUT AT BE ON "
    "HIM IS THEY ALL BY SO THIS WHICH SAID FROM ONE WERE THERE HAVE MY ME WHEN NO WE OR AN "
    "WHAT WOULD IF THEM OUT UP INTO THEN COULD MORE BEEN WILL VERY LITTLE DON'T MAN OLD "
    "GREAT TIME HOUSE LADY CAPTAIN MORNING WATER NIGHT HEART COUNTRY THOUGHT O'CLOCK"
).split()

LHOTSE_RUNNER = """
import json, sys
from lhotse.audio.backend import get_current_audio_backend
from lhotse.recipes import prepare_librispeech
corpus, out, jobs, parts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
prepare_librispeech(corpus, dataset_parts=parts, output_dir=out, num_jobs=jobs)
print(json.dumps({"backend": type(get_current_audio_backend()).__name__}))
"""


# --------------------------------------------------------------------------- tree


def _plan_split(n_utts: int, rng: random.Random, next_spk: int) -> tuple[list, int]:
    """Speaker/chapter layout of one split: [(speaker, chapter, n_utterances)], next speaker."""
    chapters, left = [], n_utts
    while left > 0:
        speaker = next_spk
        next_spk += rng.randint(1, 9)
        for _ in range(rng.randint(1, 3)):
            if left <= 0:
                break
            n = min(left, rng.randint(100, 120))
            chapters.append((speaker, rng.randint(1000, 329999), n))
            left -= n
    return chapters, next_spk


def _make_pool(pool_dir: Path, n_files: int, rng: np.random.Generator) -> list[Path]:
    """Distinct 16 kHz mono FLAC files of 0.2-2 s of low-level noise."""
    pool_dir.mkdir(parents=True)
    lengths = rng.choice(np.arange(int(0.2 * SAMPLE_RATE), 2 * SAMPLE_RATE + 1), n_files, False)
    paths = []
    for i, n in enumerate(lengths):
        path = pool_dir / f"pool_{i:04d}.flac"
        noise = np.clip(rng.normal(0.0, 30.0, int(n)), -32768, 32767).astype(np.int16)
        sf.write(path, noise, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        paths.append(path)
    return paths


def build_tree(root: Path, splits: list[str], scale: float, pool_size: int, seed: int) -> dict:
    """Create ``root/LibriSpeech/<split>/<spk>/<chapter>/`` and return its description."""
    rng = random.Random(seed)
    pool = _make_pool(root / "pool", pool_size, np.random.default_rng(seed))
    counts: dict[str, int] = {}
    next_spk = 19
    for split in splits:
        n_utts = max(1, round(SPLIT_SIZES[split] * scale))
        chapters, next_spk = _plan_split(n_utts, rng, next_spk)
        for speaker, chapter, n in chapters:
            folder = root / "LibriSpeech" / split / str(speaker) / str(chapter)
            folder.mkdir(parents=True, exist_ok=True)
            lines = []
            for k in range(n):
                utt = f"{speaker}-{chapter}-{k:04d}"
                os.link(rng.choice(pool), folder / f"{utt}.flac")
                lines.append(f"{utt} {' '.join(rng.choices(VOCAB, k=rng.randint(5, 30)))}\n")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
        counts[split] = n_utts
    spec = {"splits": counts, "scale": scale, "pool": pool_size, "seed": seed}
    (root / MARKER).write_text(json.dumps(spec, indent=1))
    return spec


def tree_ids(root: Path, split: str) -> set[str]:
    """Utterance IDs of one split, from its transcripts."""
    ids: set[str] = set()
    for trans in (root / "LibriSpeech" / split).glob("*/*/*.trans.txt"):
        ids.update(line.split(" ", 1)[0] for line in trans.read_text().splitlines())
    return ids


def warm_cache(root: Path) -> int:
    """Walk the tree once: stat every entry and read the first 4 KiB of every file."""
    n, stack = 0, [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    with open(entry.path, "rb") as f:
                        f.read(4096)
                    n += 1
    return n


# --------------------------------------------------------------------------- runs


@dataclass
class Timing:
    """Wall and CPU seconds of the repeated runs of one tool."""

    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)


def timed_run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` as a child process: (wall s, child CPU s, stdout); raises on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return wall, cpu, proc.stdout


def ours_cmd(prepare: Path, root: Path, out: Path, splits: list[str], workers: int) -> list[str]:
    """Command line of our preparation over ``splits``."""
    groups = {"--tr_splits": TRAIN, "--dev_splits": DEV, "--te_splits": TEST}
    cmd = [sys.executable, str(prepare), "--data_folder", str(root), "--save_folder", str(out)]
    for flag, members in groups.items():
        chosen = [s for s in splits if s in members]
        if chosen:
            cmd += [flag, *chosen]
    return [*cmd, "--num_workers", str(workers), "--quiet"]


def lhotse_cmd(root: Path, out: Path, splits: list[str], jobs: int) -> list[str]:
    """Command line running lhotse's recipe over ``splits``."""
    corpus = str(root / "LibriSpeech")
    return [sys.executable, "-c", LHOTSE_RUNNER, corpus, str(out), str(jobs), *splits]


# --------------------------------------------------------------------------- checks


def _check_duration(path: str, duration: float, where: str) -> None:
    frames = sf.info(path).frames
    if abs(duration - frames / SAMPLE_RATE) > 1e-9:
        raise AssertionError(f"{where}: duration {duration} != {frames} samples / {SAMPLE_RATE}")


def verify_ours(out: Path, root: Path, spec: dict, n_sample: int, rng: random.Random) -> int:
    """Row counts, IDs and sampled durations of our CSVs; returns the number of rows."""
    total = 0
    for split, expected in spec["splits"].items():
        with open(out / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != expected:
            raise AssertionError(f"ours {split}.csv: {len(rows)} rows, tree has {expected}")
        if {r["ID"] for r in rows} != tree_ids(root, split):
            raise AssertionError(f"ours {split}.csv: IDs differ from the tree's transcripts")
        for r in rng.sample(rows, min(n_sample, len(rows))):
            _check_duration(r["wav"], float(r["duration"]), f"ours {split}.csv {r['ID']}")
        total += len(rows)
    return total


def verify_lhotse(out: Path, spec: dict, n_sample: int, rng: random.Random) -> int:
    """Recording counts and sampled durations of lhotse's manifests; returns the count."""
    total = 0
    for split, expected in spec["splits"].items():
        with gzip.open(out / f"librispeech_recordings_{split}.jsonl.gz", "rt") as f:
            lines = f.readlines()
        if len(lines) != expected:
            raise AssertionError(f"lhotse {split}: {len(lines)} recordings, tree has {expected}")
        for line in rng.sample(lines, min(n_sample, len(lines))):
            rec = json.loads(line)
            if rec["num_samples"] / rec["sampling_rate"] != rec["duration"]:
                raise AssertionError(f"lhotse {rec['id']}: duration != num_samples / rate")
            _check_duration(rec["sources"][0]["source"], rec["duration"], f"lhotse {rec['id']}")
        total += len(lines)
    return total


def lhotse_default_backend(sample: str) -> str:
    """Which backend lhotse's default (composite) backend uses for a FLAC file's header."""
    from lhotse.audio.backend import CompositeAudioBackend, get_default_audio_backend

    backend = get_default_audio_backend()
    if not isinstance(backend, CompositeAudioBackend):
        return type(backend).__name__
    for b in backend.backends:
        if b.supports_info() and b.is_applicable(sample):
            try:
                b.info(sample)
            except Exception as exc:  # noqa: BLE001 - report which ones fail
                print(f"  lhotse default chain: {type(b).__name__} failed: {exc}")
                continue
            return type(b).__name__
    return "none"


# --------------------------------------------------------------------------- report


def hardware_line() -> str:
    """nproc, CPU model and load average."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"hardware: nproc {os.cpu_count()}, CPU {model}, load average {load}"


def versions_line() -> str:
    """Python and library versions."""
    import lhotse
    import torch
    import torchaudio

    return (
        f"versions: Python {platform.python_version()}, lhotse {lhotse.__version__}, "
        f"soundfile {sf.__version__} (libsndfile {sf.__libsndfile_version__}), "
        f"torch {torch.__version__}, torchaudio {torchaudio.__version__}"
    )


def table(results: dict[str, Timing], workers: int, n_utts: int) -> str:
    """Markdown table; ratio is lhotse's best wall time over the tool's."""
    base = min(results["lhotse"].walls)
    lines = [
        "| tool | workers | utterances | wall s (min / median) | files/s | CPU s (median) "
        "| ratio vs lhotse |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in results.items():
        best = min(t.walls)
        lines.append(
            f"| {name} | {workers} | {n_utts:,} | {best:.2f} / {statistics.median(t.walls):.2f} "
            f"| {n_utts / best:,.0f} | {statistics.median(t.cpus):.2f} | {base / best:.2f}x |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of utterances per split")
    p.add_argument("--splits", nargs="+", default=list(SPLIT_SIZES), choices=list(SPLIT_SIZES))
    p.add_argument("--tree", type=Path, help="build the tree here, or reuse the one found here")
    p.add_argument("--keep-tree", action="store_true", help="do not delete the temporary tree")
    p.add_argument("--pool", type=int, default=400, help="distinct FLAC files in the pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="our num_workers, lhotse's num_jobs")
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool (min and median)")
    p.add_argument("--sample", type=int, default=200, help="rows per split checked for duration")
    p.add_argument("--prepare", type=Path, default=REPO / "librispeech_prepare.py")
    p.add_argument(
        "--lhotse-backend",
        default="LibsndfileBackend",
        help="LHOTSE_AUDIO_BACKEND for lhotse's run ('default': leave unset)",
    )
    return p


def _get_tree(args: argparse.Namespace) -> tuple[Path, dict, bool]:
    """(tree root, its description, whether to delete it at the end)."""
    wanted = {s: max(1, round(SPLIT_SIZES[s] * args.scale)) for s in args.splits}
    if args.tree is None:
        root = Path(tempfile.mkdtemp(prefix="bench_prepare_tree_"))
        temporary = not args.keep_tree
    else:
        root, temporary = args.tree.resolve(), False
        marker = root / MARKER
        if marker.is_file():
            spec = json.loads(marker.read_text())
            if spec["splits"] == wanted and spec["pool"] == args.pool:
                print(f"reusing tree {root}")
                return root, spec, False
            print(f"tree {root} was built with other options: rebuilding it")
            for name in ("LibriSpeech", "pool", MARKER):
                target = root / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        elif root.exists() and any(root.iterdir()):
            raise SystemExit(
                f"--tree {root} is not empty and holds no {MARKER}; refusing to use it"
            )
        root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    spec = build_tree(root, args.splits, args.scale, args.pool, args.seed)
    total = sum(spec["splits"].values())
    print(f"built tree {root}: {total:,} utterances in {time.perf_counter() - start:.1f} s")
    return root, spec, temporary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.prepare.is_file():
        raise SystemExit(f"{args.prepare} does not exist")
    root, spec, temporary = _get_tree(args)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_out_"))
    try:
        splits, n_utts = list(spec["splits"]), sum(spec["splits"].values())
        start = time.perf_counter()
        n_files = warm_cache(root)
        print(f"warm file cache: read {n_files:,} files once ({time.perf_counter() - start:.1f} s)")
        env = dict(os.environ)
        if args.lhotse_backend != "default":
            env["LHOTSE_AUDIO_BACKEND"] = args.lhotse_backend
        results = {"ours": Timing(), "lhotse": Timing()}
        backend, rng = "?", random.Random(args.seed)
        for rep in range(args.repeats):
            out = work / f"ours_{rep}"
            wall, cpu, _ = timed_run(ours_cmd(args.prepare, root, out, splits, args.workers))
            results["ours"].walls.append(wall)
            results["ours"].cpus.append(cpu)
            verify_ours(out, root, spec, args.sample, rng)
            shutil.rmtree(out)
            out = work / f"lhotse_{rep}"
            wall, cpu, stdout = timed_run(lhotse_cmd(root, out, splits, args.workers), env)
            results["lhotse"].walls.append(wall)
            results["lhotse"].cpus.append(cpu)
            backend = json.loads(stdout.strip().splitlines()[-1])["backend"]
            verify_lhotse(out, spec, args.sample, rng)
            shutil.rmtree(out)
            print(
                f"run {rep + 1}/{args.repeats}: ours {results['ours'].walls[-1]:.2f} s, "
                f"lhotse {wall:.2f} s (outputs verified)"
            )
        sample = next((root / "pool").glob("*.flac"))
        default = lhotse_default_backend(str(sample))
        speedup = min(results["lhotse"].walls) / min(results["ours"].walls)
        best = min(results["ours"].walls)
        print()
        print(
            f"LibriSpeech manifest preparation, {', '.join(splits)} (scale {args.scale}), "
            f"warm file cache, each tool a separate process, {args.repeats} repeat(s)"
        )
        print()
        print(table(results, args.workers, n_utts))
        print()
        print(hardware_line())
        print(versions_line())
        print(
            f"lhotse audio backend: {backend} (LHOTSE_AUDIO_BACKEND="
            f"{env.get('LHOTSE_AUDIO_BACKEND', 'unset')}); its default chain uses {default} "
            "for .flac headers"
        )
        print(
            f"goal: ours >= {GOAL_SPEEDUP:.0f}x lhotse: {speedup:.2f}x "
            f"{'PASS' if speedup >= GOAL_SPEEDUP else 'FAIL'}; "
            f"ours <= {GOAL_WALL_S:.0f} s on 2 cores: {best:.2f} s "
            f"{'PASS' if best <= GOAL_WALL_S else 'FAIL'}"
            + ("" if os.cpu_count() == 2 else f" (measured on {os.cpu_count()} cores)")
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"tree kept at {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
