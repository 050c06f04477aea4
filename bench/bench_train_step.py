#!/usr/bin/env python3
"""Benchmark one training step: ConMamba-S vs Conformer-S (hparams/CTC/*_small.yaml), or
ConMamba-L with and without activation checkpointing.

Usage:
    python bench/bench_train_step.py                     # CPU, batch 8 x 10 s, torch threads
    python bench/bench_train_step.py --threads 1 --repeats 5
    python bench/bench_train_step.py --device cuda        # GPU: with and without mamba-ssm
    python bench/bench_train_step.py --activation_checkpointing --repeats 2   # 8 x 15 s

A step is what ``train_CTC.py`` does per batch: Fbank, normalisation, CNN front-end, encoder,
CTC head, CTC loss, backward, gradient clipping and an AdamW step, on a fixed batch of
``--batch`` random 16 kHz waveforms of ``--seconds`` seconds with 150 random characters each.
Both models come from their YAML files, so the table follows the configurations. Times are
the best of ``--repeats`` steps after one warm-up step, both models timed in the same run.
On CUDA the ConMamba step runs three times: with mamba-ssm's kernels (if installed), with our
pure-PyTorch scan (``MAMBA_ASR_SCAN_IMPL=torch``) and with our Triton scan (``triton``).

``--activation_checkpointing`` (batch 8 x 15 s unless given) measures ``conmamba_large``'s
CTC step and its S2S step (as ``train_S2S.py``: CTC loss on the encoder output plus the
label-smoothed attention loss of the decoder on the target tokens, ``ctc_weight`` between
them, about 3.3 tokens a second) without the recipes' ``activation_checkpointing``
(:mod:`modules.activation_checkpointing`), with it on every layer and on the first N layers
of each stack (``PARTIAL_LAYERS``: half the encoder's): step time (best of ``--repeats``
after one warm-up step) and peak memory. Each run is a process of its own, since peak
resident memory is a per-process high-water mark. On CPU the child resets the mark before each timed
step (``5`` into ``/proc/self/clear_refs``, Linux) and reads ``VmHWM`` after it; the child
runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every tensor of 64 KiB or more
with its own mapping and returns it to the system when freed, and resident memory follows the
live tensors instead of glibc's retained heap. On CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. Activation memory is the peak over the step's forward and
backward passes minus what was resident (allocated) before the step: the model, its AdamW
state and its gradients, which stay allocated between these steps (zeroed, not freed), so
the difference is the activations and the backward pass's temporaries. (The optimizer step
after them, the same with and without, is timed but not in the peak.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
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
from modules.activation_checkpointing import enable_activation_checkpointing  # noqa: E402
from modules.mamba.selective_scan_interface import ENV_VAR, kernel_status  # noqa: E402

CONFIGS = {"conformer_small": "Conformer-S", "conmamba_small": "ConMamba-S"}
RECIPES = ("CTC", "S2S")
# Target tokens a second of speech: characters (CTC) and 5,000 BPE pieces (S2S), LibriSpeech.
TOKENS_PER_SECOND = {"CTC": 15.0, "S2S": 3.3}
# --activation_checkpointing: the model, its utterance length unless given (batch: 8, as the
# default mode's), the malloc setting of its child processes.
CKPT_CONFIG = "conmamba_large"
CKPT_SECONDS = 15.0
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# The partial setting measured besides none and all: the first N layers of each stack (half
# the encoder's: CTC 9 of 18 ConMamba layers; S2S 6 of 12, and the decoder's 6 of 6).
PARTIAL_LAYERS = {"CTC": 9, "S2S": 6}


def build_step(
    name: str, args: argparse.Namespace, out: str, freeze: Sequence[str] = (),
    recipe: str = "CTC", activation_checkpointing: bool | int = False,
    after_backward: Callable[[], None] | None = None,
) -> tuple[Callable[[], float], int, torch.optim.Optimizer]:
    """A closure running one training step of ``hparams/<recipe>/<name>.yaml`` (``args``:
    device, batch, seconds), its parameter count and its optimizer; parameters that ``freeze``
    patterns match (``mamba_asr.finetune``'s, as the recipes' ``freeze``) are not trained;
    ``activation_checkpointing``: the encoder/decoder layers recompute in the backward pass
    (True: all; N: the first N of each stack, as the recipes' key).
    CTC: encoder, CTC loss; S2S: encoder and decoder, CTC + attention loss (``train_S2S.py``).
    With ``after_backward`` (called between the backward pass and clipping) the gradients
    stay allocated between steps (zeroed, not freed)."""
    with open(REPO / "hparams" / recipe / f"{name}.yaml", encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"data_folder": out, "output_folder": out})
    device = args.device
    model = hp["model"].to(device).train()
    normalize = hp["normalize"].to(device)
    features = hp["compute_features"].to(device)
    if freeze:
        modules = torch.nn.ModuleDict(hp["modules"])
        finetune.set_trainable(finetune.frozen_parameters(modules, list(freeze)).values(), False)
    if activation_checkpointing is not False:
        enable_activation_checkpointing(
            model, None if activation_checkpointing is True else activation_checkpointing)
    opt = hp["model_opt_class"](model.parameters())
    gen = torch.Generator().manual_seed(0)
    wavs = 0.1 * torch.randn(args.batch, int(args.seconds * 16000), generator=gen).to(device)
    wav_lens = torch.ones(args.batch, device=device)
    n_tokens = round(TOKENS_PER_SECOND[recipe] * args.seconds)
    tokens = torch.randint(3, hp["output_neurons"], (args.batch, n_tokens), generator=gen)
    tokens, tok_lens = tokens.to(device), torch.ones(args.batch, device=device)
    if recipe == "S2S":
        bos = torch.full((args.batch, 1), hp["bos_index"], device=device)
        eos = torch.full((args.batch, 1), hp["eos_index"], device=device)
        tokens_bos, tokens_eos = torch.cat([bos, tokens], 1), torch.cat([tokens, eos], 1)

    def loss_of(feats: torch.Tensor) -> torch.Tensor:
        src = hp["CNN"](feats)
        if recipe == "CTC":
            enc, _ = hp["Transformer"](src, None, wav_lens)
            p_ctc = hp["log_softmax"](hp["ctc_lin"](enc).float())
            return hp["ctc_cost"](p_ctc, tokens, wav_lens, tok_lens)
        enc, dec = hp["Transformer"](src, tokens_bos, wav_lens, pad_idx=hp["pad_index"])
        p_ctc = hp["log_softmax"](hp["ctc_lin"](enc).float())
        p_seq = hp["log_softmax"](hp["seq_lin"](dec).float())
        loss_seq = hp["seq_cost"](p_seq, tokens_eos, length=tok_lens)
        loss_ctc = hp["ctc_cost"](p_ctc, tokens, wav_lens, tok_lens)
        return hp["ctc_weight"] * loss_ctc + (1 - hp["ctc_weight"]) * loss_seq

    def step() -> float:
        loss = loss_of(normalize(features(wavs), wav_lens, epoch=1))
        loss.backward()
        if after_backward is not None:
            after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=after_backward is None)
        return loss.item()

    return step, sum(p.numel() for p in model.parameters()), opt


def parse_step_args(
    parser: argparse.ArgumentParser, seconds: float | None = 10.0
) -> argparse.Namespace:
    """``parser``'s arguments plus the step's (``--batch``, ``--seconds`` (default
    ``seconds``), ``--repeats``, ``--threads``, ``--device``), parsed; ``--threads`` applied
    to torch."""
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def machine(device: str) -> str:
    """The CPU and torch's thread count, or the GPU's name."""
    if device == "cpu":
        return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return torch.cuda.get_device_name()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--activation_checkpointing", action="store_true",
                        help=f"{CKPT_CONFIG} CTC and S2S with and without it (8 x 15 s)")
    parser.add_argument("--measure", metavar="RECIPE:0|1", help=argparse.SUPPRESS)
    args = parse_step_args(parser, seconds=None)
    if args.activation_checkpointing or args.measure:
        if args.seconds is None:
            args.seconds = CKPT_SECONDS
        if args.measure:
            recipe, setting = args.measure.split(":")
            print(json.dumps(measure(recipe, parse_setting(setting), args)))
        else:
            compare_checkpointing(args)
        return
    if args.seconds is None:
        args.seconds = 10.0
    where = machine(args.device)
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


# ---------------------------------------------------------------------- activation checkpointing


def _proc_status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Sets this process's VmHWM to its current resident size (Linux)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def parse_setting(text: str) -> bool | int:
    """``--measure``'s checkpointing setting: "no", "all" or a number of layers per stack."""
    return {"no": False, "all": True}.get(text) if text in ("no", "all") else int(text)


def setting_name(setting: bool | int) -> str:
    """How the table names a checkpointing setting."""
    if setting is False:
        return "no"
    return "all layers" if setting is True else f"first {setting} per stack"


def measure(recipe: str, enabled: bool | int, args: argparse.Namespace) -> dict[str, float]:
    """One run (a process of its own): ``CKPT_CONFIG``'s ``recipe`` step with checkpointing
    ``enabled`` or not: parameters, best step time, memory before the step and its peak over
    the forward and backward passes (MB; CPU: resident, CUDA: allocated)."""
    cuda = args.device == "cuda"
    peaks: list[float] = []

    def record_peak() -> None:
        peaks.append(torch.cuda.max_memory_allocated() / 2**20 if cuda
                     else _proc_status_kb("VmHWM") / 1024)

    with tempfile.TemporaryDirectory() as out:
        step, params, _ = build_step(CKPT_CONFIG, args, out, recipe=recipe,
                                     activation_checkpointing=enabled,
                                     after_backward=record_peak)
        step()  # warm-up: AdamW state and the gradients exist, lazy initialisations are done
        times, before, peaks[:] = [], [], []
        for _ in range(args.repeats):
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before.append(torch.cuda.memory_allocated() / 2**20)
            else:
                _reset_peak_rss()
                before.append(_proc_status_kb("VmRSS") / 1024)
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    worst = max(range(len(peaks)), key=lambda i: peaks[i] - before[i])
    return {"params": params, "step_s": min(times), "before_mb": before[worst],
            "peak_mb": peaks[worst]}


def compare_checkpointing(args: argparse.Namespace) -> None:
    """Prints the markdown table of ``CKPT_CONFIG``'s CTC and S2S steps without and with
    activation checkpointing, each run in a child process (:func:`measure`)."""
    memory = "max allocated" if args.device == "cuda" else "peak RSS"
    print(f"# {CKPT_CONFIG} training step, batch {args.batch} x {args.seconds:g} s, fp32, "
          f"{args.device} ({machine(args.device)}), best of {args.repeats} after a warm-up")
    print(f"# memory: {memory}; activation memory = peak over the forward and backward passes - "
          f"memory before the step (model, gradients, AdamW state)")
    header = ("| recipe | activation checkpointing | params | step s | before MB | peak MB | "
              "activation MB | activation memory | step time |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    goals = []
    for recipe in RECIPES:
        results: dict[bool | int, dict[str, float]] = {}
        for setting in (False, True, PARTIAL_LAYERS[recipe]):
            spec = {False: "no", True: "all"}.get(setting, str(setting))
            cmd = [sys.executable, __file__, "--measure", f"{recipe}:{spec}",
                   "--batch", str(args.batch), "--seconds", str(args.seconds),
                   "--repeats", str(args.repeats), "--device", args.device]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, **CHILD_ENV})
            if proc.returncode != 0:
                why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                print(f"| {recipe} | {setting_name(setting)} | failed: {why} |", flush=True)
                break
            r = results[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
            activation = r["peak_mb"] - r["before_mb"]
            base = results[False]
            base_activation = base["peak_mb"] - base["before_mb"]
            print(f"| {recipe} | {setting_name(setting)} | {r['params'] / 1e6:.1f} M | "
                  f"{r['step_s']:.2f} | {r['before_mb']:,.0f} | {r['peak_mb']:,.0f} | "
                  f"{activation:,.0f} | {activation / base_activation:.2f}× | "
                  f"{r['step_s'] / base['step_s']:.2f}× |", flush=True)
            if setting is False:
                continue
            saved = 1 - activation / base_activation
            slower = r["step_s"] / base["step_s"] - 1
            met = "met" if saved >= 0.40 and slower <= 0.35 else "not met"
            goals.append(f"{recipe}, {setting_name(setting)}: {saved:.0%} less activation "
                         f"memory for {slower:+.0%} step time: goal (>= 40 % less for <= 35 % "
                         f"more) {met}")
    print("\n".join(f"# {line}" for line in goals))


if __name__ == "__main__":
    main()
