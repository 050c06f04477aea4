#!/usr/bin/env python3
"""Benchmark fine-tuning: adapting the CTC demo model to new voices, and what freezing saves.

Usage:
    python bench/bench_finetune.py                   # after make demo (its run is the source)
    python bench/bench_finetune.py --source results/demo/demo_CTC/3402 --out results/bench_ft
    python bench/bench_finetune.py --no_adaptation   # only the freezing table (no corpus)

Part 1, adaptation (the demo corpus's adapt splits: test-other's voices, new sentences): the
adapt-test and test-clean (forgetting) WER of the source model (``evaluate.py`` on the
fine-tuning run's manifests), of ``hparams/CTC/finetune_demo.yaml`` (``train_CTC.py
--init_from <source>``) and of the same architecture trained from scratch on adapt-train alone
(``hparams/CTC/demo.yaml``'s hyperparameters on the adapt splits) for the same number of
epochs, hence the same budget: the runs differ only in their initial weights and learning
rates. The training time of a run (its epochs with their validation, without data preparation
and testing) is read from the timestamps of its ``log.txt``. Every run is a separate process; a
run already in ``--out`` is only re-evaluated.

Part 2, freezing (in-process, ``--config``, ConMamba-S by default): time of one CTC training
step (``bench_train_step.py``'s, a fixed random batch) and the bytes of AdamW state with the
encoder's first half frozen (``freeze: [Transformer.encoder.layers.0-<n/2-1>]``) vs nothing
frozen, both in the same run, their steps interleaved. Times are the best of ``--repeats``
after a warm-up step each.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from bench_train_step import build_step, parse_step_args  # noqa: E402
from timing import best_time  # noqa: E402

from mamba_asr.reports.wer_table import read_wer_file  # noqa: E402

TEST_SETS = ("adapt-test", "test-clean")
# The adapt splits, as hparams/CTC/finetune_demo.yaml names them (overrides of demo.yaml).
ADAPT_SPLITS = {
    "train_splits": '["adapt-train"]', "dev_splits": '["adapt-dev"]',
    "test_splits": '["adapt-test", "test-clean"]',
}


def run(cmd: list[str], log: Path) -> None:
    """Runs ``cmd`` in the repository (output to ``log``); exits naming the log if it fails."""
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def training_seconds(run_folder: Path) -> float:
    """Seconds from ``Going into epoch 1`` to the last end-of-epoch checkpoint in the run's
    ``log.txt`` (SpeechBrain's ``YYYY-MM-DD HH:MM:SS,mmm - ...`` lines)."""
    def stamp(line: str) -> datetime:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")

    lines = (run_folder / "log.txt").read_text(encoding="utf-8").splitlines()
    start = next(stamp(x) for x in lines if x.endswith("Going into epoch 1"))
    end = [stamp(x) for x in lines if "Saved an end-of-epoch checkpoint" in x][-1]
    return (end - start).total_seconds()


def wers(folder: Path) -> list[float]:
    """The WER of each of TEST_SETS from the ``wer_<set>.json`` files in ``folder``."""
    return [read_wer_file(folder / f"wer_{name}.json")["WER"] for name in TEST_SETS]


def epochs_run(train_log: Path) -> int:
    """The number of epoch lines in a run's ``train_log.txt``."""
    return sum(line.startswith("epoch: ") for line in train_log.read_text().splitlines())


def adaptation(args: argparse.Namespace, out: Path) -> None:
    """Part 1: before, fine-tuned, from scratch (same epochs): WER and training time."""
    threads = ["--cpu_threads", str(args.threads)] if args.threads else []
    py = sys.executable
    common = ["--data_folder", str(args.data_folder), "--noprogressbar", *threads]
    tuned = out / "finetune"
    run([py, "train_CTC.py", "hparams/CTC/finetune_demo.yaml", *common,
         "--output_folder", str(tuned), "--init_from", str(args.source)], out / "finetune.log")
    epochs = epochs_run(tuned / "train_log.txt")
    prepared = tuned / "prepared"
    run([py, "evaluate.py", "hparams/CTC/demo.yaml", "--ckpt", str(args.source),
         "--out_dir", str(out / "before"), "--test_csv",
         *(str(prepared / f"{name}.csv") for name in TEST_SETS), *threads],
        out / "before.log")
    scratch = out / "scratch"
    overrides = [x for key, value in ADAPT_SPLITS.items() for x in (f"--{key}", value)]
    run(
        [py, "train_CTC.py", "hparams/CTC/demo.yaml", *common, "--output_folder", str(scratch),
         *overrides, "--valid_csv", str(scratch / "prepared" / "adapt-dev.csv"),
         "--test_csv", str([str(scratch / "prepared" / f"{n}.csv") for n in TEST_SETS]),
         "--number_of_epochs", str(epochs)],
        out / "scratch.log",
    )
    print(f"\n## Adaptation to new voices (source {args.source}; {epochs} epochs on "
          "adapt-train)\n")
    print("| model | adapt-test WER | test-clean WER | training time |")
    print("|---|---:|---:|---:|")
    rows = [("source (before)", wers(out / "before"), None),
            ("fine-tuned (finetune_demo.yaml)", wers(tuned), training_seconds(tuned)),
            ("from scratch on adapt-train", wers(scratch), training_seconds(scratch))]
    for label, (adapt, clean), seconds in rows:
        took = "-" if seconds is None else f"{seconds / 60:.1f} min"
        print(f"| {label} | {adapt:.2f} | {clean:.2f} | {took} |", flush=True)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: step, exp_avg, exp_avg_sq)."""
    return sum(v.numel() * v.element_size() for state in opt.state.values()
               for v in state.values() if torch.is_tensor(v))


def freezing(args: argparse.Namespace) -> None:
    """Part 2: step time and optimizer state, encoder's first half frozen vs nothing."""
    from hyperpyyaml import load_hyperpyyaml

    with open(REPO / "hparams" / "CTC" / f"{args.config}.yaml", encoding="utf-8") as f:
        with tempfile.TemporaryDirectory() as tmp:
            layers = load_hyperpyyaml(f, {"data_folder": tmp})["num_encoder_layers"]
    half = f"Transformer.encoder.layers.0-{layers // 2 - 1}"
    where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n## Freezing: {args.config}, CTC training step, batch {args.batch} x "
          f"{args.seconds:g} s, fp32, {args.device} ({where})\n")
    print("| freeze | trainable params | step s | AdamW state | vs nothing frozen |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for freeze in ([], [half]):
            torch.manual_seed(0)
            step, _, opt = build_step(args.config, args, tmp, freeze)
            step()  # warm-up; the steps fill the optimizer state
            runs.append((freeze, step, opt, []))
        for _ in range(args.repeats):  # interleaved: both see the same machine
            for _, step, _, times in runs:
                times.append(best_time(step, 1, args.device, warmup=False))
    reference = None
    for freeze, _, opt, times in runs:
        trainable = sum(p.numel() for g in opt.param_groups for p in g["params"]
                        if p.requires_grad)
        seconds, state = min(times), optimizer_bytes(opt)
        reference = reference or (seconds, state)
        print(f"| {', '.join(freeze) or 'nothing'} | {trainable / 1e6:.2f} M | {seconds:.3f} | "
              f"{state / 2**20:.1f} MiB | {seconds / reference[0]:.2f}x time, "
              f"{state / reference[1]:.2f}x state |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=Path("results/demo/demo_CTC/3402"),
                        help="the model to adapt (the run make demo leaves)")
    parser.add_argument("--data_folder", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=None,
                        help="where the runs go (default: a temporary folder)")
    parser.add_argument("--no_adaptation", action="store_true", help="only part 2")
    parser.add_argument("--config", default="conmamba_small", help="hparams/CTC config, part 2")
    args = parse_step_args(parser)
    freezing(args)
    if args.no_adaptation:
        return
    if not (REPO / args.source).exists():
        sys.exit(f"error: {args.source}: no such run (run make demo, or give --source)")
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)).resolve()
        out.mkdir(parents=True, exist_ok=True)
        adaptation(args, out)


if __name__ == "__main__":
    main()
