#!/usr/bin/env python3
"""Benchmark the exportable scan's chunk length: a CTC model.onnx in onnxruntime vs eager PyTorch.

Usage:
    python bench/bench_onnx_scan.py                                # ConMamba-S, K 16 32 64
    python bench/bench_onnx_scan.py --chunks 8 16 --seconds 10 60 600 --threads 2

For each chunk length K (``modules.mamba.selective_scan_export.CHUNK``) the configuration's
model (random weights: time does not depend on them) is exported to ONNX once; then, for each
input length, every model.onnx and the eager SpeechBrain modules (normalisation, CNN, encoder,
CTC head: what model.onnx holds, on the chunked PyTorch scan) run the same random features,
in turn, ``--repeats`` rounds, and the best time of each is printed with its real-time factor
(100 feature frames a second) and the largest difference of its log-probabilities from eager.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mamba_asr.export import export_untrained  # noqa: E402
from mamba_asr.onnx_export import load_ctc  # noqa: E402
from mamba_asr.ort.transcriber import MODEL_FILE  # noqa: E402
from modules.mamba import selective_scan_export  # noqa: E402

FRAMES_PER_SECOND = 100


def eager_fn(asr, feats: torch.Tensor):
    """The eager modules model.onnx holds, on one padded-free batch of features."""
    h = asr.hparams
    relative = torch.ones(feats.shape[0])

    def run() -> np.ndarray:
        with torch.no_grad():
            enc = h.Transformer.encode(h.CNN(h.normalize(feats, relative)), relative)
            return h.log_softmax(h.ctc_lin(enc).float()).numpy()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", default="hparams/CTC/conmamba_small.yaml")
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads

    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for k in args.chunks:
            selective_scan_export.CHUNK = k
            start = time.perf_counter()
            export_untrained(args.hparams, Path(tmp) / f"k{k}", onnx=True)
            print(f"K={k}: exported in {time.perf_counter() - start:.0f} s", flush=True)
            sessions[f"onnx K={k}"] = ort.InferenceSession(
                str(Path(tmp) / f"k{k}" / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        asr = load_ctc(Path(tmp) / f"k{args.chunks[0]}")
        n_mels = int(asr.hparams.compute_features.compute_fbanks.n_mels)

        print(f"\n{args.hparams}, {args.threads} threads, best of {args.repeats}")
        print(f"{'seconds':>8} {'path':<14} {'time s':>8} {'RTF':>7} {'max |diff|':>11}")
        for seconds in args.seconds:
            frames = round(seconds * FRAMES_PER_SECOND)
            feats = torch.randn(1, frames, n_mels, generator=torch.Generator().manual_seed(0))
            feed = {"features": feats.numpy(), "feature_lengths": np.array([frames], np.int64)}
            runs = {"eager": eager_fn(asr, feats)}
            for name, session in sessions.items():
                runs[name] = lambda s=session, feed=feed: s.run(None, feed)[0]
            reference = runs["eager"]()
            best = dict.fromkeys(runs, float("inf"))
            diff = {}
            for _ in range(args.repeats):  # interleaved: the machine's load hits all alike
                for name, fn in runs.items():
                    start = time.perf_counter()
                    out = fn()
                    best[name] = min(best[name], time.perf_counter() - start)
                    diff[name] = float(np.abs(out - reference).max())
            for name in runs:
                print(f"{seconds:>8g} {name:<14} {best[name]:>8.3f} {best[name] / seconds:>7.4f} "
                      f"{diff[name]:>11.2e}", flush=True)


if __name__ == "__main__":
    main()
