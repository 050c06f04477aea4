#!/usr/bin/env python3
"""Benchmark what recording the sha256 of every checkpoint file adds to a save, and what
verifying them costs, for the large S2S configuration (hparams/S2S/conmamba_large.yaml).

Usage:
    python bench/bench_checkpoint.py                     # ConMamba-L S2S, 3 repeats
    python bench/bench_checkpoint.py --repeats 5 --dir /data/tmp   # the save folder's disk
    python bench/bench_checkpoint.py --config hparams/S2S/conmamba_small.yaml

The checkpointer is the configuration's own (``AtomicCheckpointer``: model, scheduler,
normaliser, epoch counter) plus the AdamW optimizer after one step on random gradients, so
the files are those a run saves at the end of an epoch. Each repeat saves once with the
sha256 recorded and once without (the hashing left out), alternately, into the same folder
(the checkpoint deleted after each save); the times are the best of ``--repeats``, each save
including its fsyncs, beside the CPU time of the process (all threads) in the same save: the
hashing runs on a background thread while the save writes and fsyncs, so its wall-time cost
depends on a core being free meanwhile, its CPU cost does not. Verifying: the sha256 of every
file of the checkpoint with the per-process digest cache empty (the first listing in a new
process: recovery, evaluate.py, export.py), next to loading the checkpoint into the modules.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from timing import best_time  # noqa: E402

import mamba_asr  # noqa: E402, F401  (drops SpeechBrain's torchvision notice)
from mamba_asr import checkpoints  # noqa: E402

GOAL = 0.05  # hashing may add this fraction to a save


class _NoHashing(checkpoints._Hasher):
    """The save without digests, for the baseline."""

    def add(self, path: Path) -> None:
        pass

    def digests(self) -> dict[str, str]:
        return {}


def build_checkpointer(config: Path, out: str) -> tuple[checkpoints.AtomicCheckpointer, int]:
    """The configuration's checkpointer with its optimizer after one step; the parameters."""
    with open(config, encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"data_folder": out, "output_folder": out})
    model = hp["model"]
    opt = hp["model_opt_class"](model.parameters())
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    ckpter = hp["checkpointer"]
    ckpter.add_recoverable("optimizer", opt)
    return ckpter, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "hparams/S2S/conmamba_large.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to save (default: a temp)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as out:
        ckpter, params = build_checkpointer(args.config, out)

        cpu: dict[str, float] = {}

        def save(name: str) -> None:
            start = time.process_time()
            ckpt = ckpter.save_checkpoint(verbosity=0)
            cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - start)
            shutil.rmtree(ckpt.path)

        saves = {"no sha256": float("inf"), "sha256": float("inf")}
        real_hasher = checkpoints._Hasher
        for _ in range(args.repeats):
            for name, hasher in (("no sha256", _NoHashing), ("sha256", real_hasher)):
                checkpoints._Hasher = hasher
                seconds = best_time(lambda: save(name), 1, "cpu", warmup=False)  # noqa: B023
                saves[name] = min(saves[name], seconds)
        checkpoints._Hasher = real_hasher

        ckpt = ckpter.save_checkpoint(verbosity=0)
        size = sum(f.stat().st_size for f in ckpt.path.iterdir())

        def verify() -> None:
            checkpoints._DIGEST_CACHE.clear()
            assert ckpter.check_checkpoint_dir(ckpt.path) is None

        verify_s = best_time(verify, args.repeats, "cpu")
        load_s = best_time(lambda: ckpter.load_checkpoint(ckpt), args.repeats, "cpu")

    added = saves["sha256"] - saves["no sha256"]
    print(f"# checkpoint save and verification, {args.config.name}: "
          f"{params / 1e6:.1f} M parameters, {size / 1e6:,.0f} MB of files (model + AdamW "
          f"state), best of {args.repeats}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("| step | wall s | CPU s | MB/s | wall vs save without sha256 |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        ("save, no sha256", saves["no sha256"], cpu["no sha256"]),
        ("save, sha256 recorded", saves["sha256"], cpu["sha256"]),
        ("verify: sha256 of the files (cold digest cache)", verify_s, None),
        ("load into the modules (torch.load)", load_s, None),
    ]
    for name, seconds, cpu_s in rows:
        cpu_text = "" if cpu_s is None else f"{cpu_s:.2f}"
        print(f"| {name} | {seconds:.2f} | {cpu_text} | {size / 1e6 / seconds:,.0f} | "
              f"{seconds / saves['no sha256']:.2f}x |")
    verdict = "met" if added <= GOAL * saves["no sha256"] else "missed"
    print(f"hashing adds {added:+.3f} s wall ({added / saves['no sha256']:+.1%}; goal: under "
          f"{GOAL:.0%}: {verdict}) and {cpu['sha256'] - cpu['no sha256']:+.3f} s CPU to a save")


if __name__ == "__main__":
    main()
