#!/usr/bin/env python3
"""Benchmark one encoder layer: ConMamba-S (ours) vs Conformer-S (SpeechBrain's).

Usage:
    python bench/bench_encoder_layer.py                        # CPU, batch 4, 10/30/120 s
    python bench/bench_encoder_layer.py --seconds 10 30 120 240 --batch 2 --threads 2
    python bench/bench_encoder_layer.py --device cuda

Both layers use the S2S small settings of the paper (d_model 144, d_ffn 1024, kernel 31,
dropout 0; Conformer: 4 heads of RelPosMHAXL attention, Swish; ConMamba: bidirectional
"v2" Mamba with d_state 16, expand 2, d_conv 4, GELU). A clip of S seconds is S * 100 / 4
frames after the 4x front-end (10 ms hop). "forward" runs under ``torch.no_grad()``;
"fwd+bwd" backpropagates the sum of the output. Times are the best of ``--repeats`` runs
after one warm-up; "ms/frame" divides by batch x frames to show how each layer scales
(constant for linear cost, growing for quadratic attention).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoderLayer
from speechbrain.nnet.attention import RelPosEncXL
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from timing import best_time  # noqa: E402

from modules.Conmamba import ConmambaEncoderLayer  # noqa: E402

D_MODEL, D_FFN, NHEAD = 144, 1024, 4
MAMBA_CONFIG = {"d_state": 16, "expand": 2, "d_conv": 4, "bidirectional": True}


def layers(device: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> function (B, L, D) -> (B, L, D) of one freshly initialised layer."""
    conmamba = ConmambaEncoderLayer(D_MODEL, D_FFN, activation=nn.GELU,
                                    mamba_config=MAMBA_CONFIG).to(device)
    conformer = ConformerEncoderLayer(D_MODEL, D_FFN, NHEAD, attention_type="RelPosMHAXL"
                                      ).to(device)
    pos = RelPosEncXL(D_MODEL).to(device)

    def run_conformer(x: torch.Tensor) -> torch.Tensor:
        return conformer(x, pos_embs=pos(x))[0]

    return {"conmamba": conmamba, "conformer": run_conformer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 30, 120])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fns = layers(args.device)
    threads = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name() if args.device == "cuda" else threads
    print(f"# encoder layer, d_model {D_MODEL}, batch {args.batch}, fp32, {args.device} ({where})")
    header = "| audio | frames | layer | forward s | ms/frame | fwd+bwd s | ConMamba/Conformer |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for seconds in args.seconds:
        frames = int(seconds * 100 / 4)
        x = torch.randn(args.batch, frames, D_MODEL, device=args.device)
        times: dict[str, tuple[float, float]] = {}
        for name, fn in fns.items():
            with torch.no_grad():
                fwd = best_time(lambda fn=fn, x=x: fn(x), args.repeats, args.device)
            bwd = float("nan")
            if not args.no_backward:
                xg = x.clone().requires_grad_(True)
                bwd = best_time(lambda fn=fn, xg=xg: fn(xg).sum().backward(), args.repeats,
                                args.device)
            times[name] = (fwd, bwd)
        ratio = times["conmamba"][0] / times["conformer"][0]
        for name, (fwd, bwd) in times.items():
            per_frame = 1e3 * fwd / (args.batch * frames)
            tail = f"{ratio:.2f}x" if name == "conmamba" else ""
            print(f"| {seconds:g} s | {frames} | {name} | {fwd:.3f} | {per_frame:.4f} | "
                  f"{bwd:.3f} | {tail} |", flush=True)


if __name__ == "__main__":
    main()
