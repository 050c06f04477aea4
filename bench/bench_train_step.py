#!/usr/bin/env python3
"""Benchmark one CTC training step: ConMamba-S vs Conformer-S (hparams/CTC/*_small.yaml).

Usage:
    python bench/bench_train_step.py                     # CPU, batch 8 x 10 s, torch threads
    python bench/bench_train_step.py --threads 1 --repeats 5
    python bench/bench_train_step.py --device cuda        # GPU: with and without mamba-ssm

A step is what ``train_CTC.py`` does per batch: Fbank, normalisation, CNN front-end, encoder,
CTC head, CTC loss, backward, gradient clipping and an AdamW step, on a fixed batch of
``--batch`` random 16 kHz waveforms of ``--seconds`` seconds with 150 random characters each.
Both models come from their YAML files, so the table follows the configurations. Times are
the best of ``--repeats`` steps after one warm-up step, both models timed in the same run.
On CUDA the ConMamba step runs three times: with mamba-ssm's kernels (if installed), with our
pure-PyTorch scan (``MAMBA_ASR_SCAN_IMPL=torch``) and with our Triton scan (``triton``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from timing import best_time  # noqa: E402

import mamba_asr  # noqa: E402, F401  (drops SpeechBrain's torchvision notice)
from mamba_asr import finetune  # noqa: E402
from modules.mamba.selective_scan_interface import ENV_VAR, kernel_status  # noqa: E402

CONFIGS = {"conformer_small": "Conformer-S", "conmamba_small": "ConMamba-S"}


def build_step(
    name: str, args: argparse.Namespace, out: str, freeze: Sequence[str] = ()
) -> tuple[Callable[[], float], int, torch.optim.Optimizer]:
    """A closure running one training step of ``hparams/CTC/<name>.yaml`` (``args``: device,
    batch, seconds), its parameter count and its optimizer; parameters that ``freeze``
    patterns match (``mamba_asr.finetune``'s, as the recipes' ``freeze``) are not trained."""
    with open(REPO / "hparams" / "CTC" / f"{name}.yaml", encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"data_folder": out, "output_folder": out})
    device = args.device
    model = hp["model"].to(device).train()
    normalize = hp["normalize"].to(device)
    features = hp["compute_features"].to(device)
    if freeze:
        modules = torch.nn.ModuleDict(hp["modules"])
        finetune.set_trainable(finetune.frozen_parameters(modules, list(freeze)).values(), False)
    opt = hp["model_opt_class"](model.parameters())
    gen = torch.Generator().manual_seed(0)
    wavs = 0.1 * torch.randn(args.batch, int(args.seconds * 16000), generator=gen).to(device)
    wav_lens = torch.ones(args.batch, device=device)
    n_chars = 150
    tokens = torch.randint(3, hp["output_neurons"], (args.batch, n_chars), generator=gen)
    tokens, tok_lens = tokens.to(device), torch.ones(args.batch, device=device)

    def step() -> float:
        feats = normalize(features(wavs), wav_lens, epoch=1)
        enc, _ = hp["Transformer"](hp["CNN"](feats), None, wav_lens)
        p_ctc = hp["log_softmax"](hp["ctc_lin"](enc).float())
        loss = hp["ctc_cost"](p_ctc, tokens, wav_lens, tok_lens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in model.parameters()), opt


def parse_step_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments plus the step's (``--batch``, ``--seconds``, ``--repeats``,
    ``--threads``, ``--device``), parsed; ``--threads`` applied to torch."""
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = parse_step_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    if args.device == "cpu":
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    else:
        where = torch.cuda.get_device_name()
    print(f"# CTC training step, batch {args.batch} x {args.seconds:g} s, fp32, "
          f"{args.device} ({where})")
    runs = [("conformer_small", None), ("conmamba_small", None)]
    if args.device == "cuda":
        status = kernel_status(args.device)
        print(f"# kernels: {status}")
        runs += [("conmamba_small", "torch"), ("conmamba_small", "triton")]
    header = "| model | scan | params | step s | vs Conformer-S |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    reference = None
    with tempfile.TemporaryDirectory() as out:
        for name, impl in runs:
            if impl is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = impl
            torch.manual_seed(0)
            step, params, _ = build_step(name, args, out)
            seconds = best_time(step, args.repeats, args.device)
            reference = seconds if reference is None else reference
            scan = "-" if name == "conformer_small" else (impl or "auto")
            print(f"| {CONFIGS[name]} | {scan} | {params / 1e6:.2f} M | {seconds:.3f} | "
                  f"{seconds / reference:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
