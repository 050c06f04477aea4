#!/usr/bin/env python3
"""Benchmark Mamba-decoder decoding: cached states vs recomputing the prefix.

Usage:
    python bench/bench_decode.py                       # ConMambaMamba-S decoder, CPU
    python bench/bench_decode.py --size large --positions 10 50 100 200 --threads 2
    python bench/bench_decode.py --device cuda

Part 1, the decoder alone: time of one decoding step for ``--hyps`` hypotheses (batch x
beam) at target position t, (a) from cached per-layer states
(``TransformerASR.decode_step``) and (b) by recomputing the whole prefix
(``TransformerASR.decode``, what SpeechBrain's ``S2STransformerBeamSearcher`` does every step).
Part 2, the whole beam search (SpeechBrain's ``S2SBeamSearcher`` machinery with the CTC
prefix scorer, ctc_weight 0.4, and a Transformer LM, lm_weight 0.6, as in the S2S configs):
``S2SMambaBeamSearcher`` vs ``S2STransformerBeamSearcher``, forced to run ``--search-tokens``
steps (end-of-sentence suppressed), time per token. Weights are random: only speed is measured.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path

import torch
from speechbrain.decoders import (
    CTCScorer,
    S2STransformerBeamSearcher,
    ScorerBuilder,
    TransformerLMScorer,
)
from speechbrain.lobes.models.transformer.TransformerLM import TransformerLM
from speechbrain.nnet.linear import Linear

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from timing import best_time  # noqa: E402

from modules.beam_search import S2SMambaBeamSearcher  # noqa: E402
from modules.TransformerASR import TransformerASR  # noqa: E402

SIZES = {"small": (144, 4, 1024), "large": (512, 6, 2048)}  # d_model, decoder layers, d_ffn
VOCAB = 5000
MAMBA_CONFIG = {"d_state": 16, "expand": 2, "d_conv": 4, "bidirectional": True}


def decoder_steps(model: TransformerASR, memory: torch.Tensor, positions: list[int],
                  device: str) -> None:
    """Part 1: per-step time at each position, cached vs recomputed."""
    hyps = memory.shape[0]
    tokens = torch.randint(3, VOCAB, (hyps, max(positions) + 1), device=device)
    print("| position | cached step ms | recompute step ms | recompute/cached |")
    print("|---:|---:|---:|---:|")
    with torch.no_grad():
        state = model.init_decoder_state(memory)
        done = 0
        for pos in positions:
            for t in range(done, pos):  # advance the cache to this position
                _, state = model.decode_step(tokens[:, t], t, state)
            done = pos
            step = lambda s=state, p=pos: model.decode_step(tokens[:, p], p, s)  # noqa: E731
            cached = best_time(step, 3, device)
            full = best_time(lambda p=pos: model.decode(tokens[:, : p + 1], memory), 3, device)
            print(f"| {pos} | {1e3 * cached:.2f} | {1e3 * full:.2f} | {full / cached:.1f}x |",
                  flush=True)


def whole_search(model: TransformerASR, seq_lin: Linear, memory: torch.Tensor, beam: int,
                 tokens: int, device: str) -> None:
    """Part 2: full beam search with CTC + LM scorers, time per token for both searchers."""
    d_model = memory.shape[-1]
    ctc_lin = Linear(input_size=d_model, n_neurons=VOCAB).to(device)
    lm = TransformerLM(vocab=VOCAB, d_model=256, nhead=4, num_encoder_layers=6,
                       num_decoder_layers=0, d_ffn=1024, dropout=0.0,
                       activation=torch.nn.GELU, normalize_before=False).to(device).eval()
    with torch.no_grad():
        seq_lin.w.bias[2] = -1e4  # suppress eos: every search runs max_decode_ratio * frames
    wav_len = torch.ones(memory.shape[0], device=device)
    print("| searcher | beam | tokens | scorers | s total | ms/token | vs recompute |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for scorers in ("none", "ctc+lm"):
        results = {}
        for cls in (S2SMambaBeamSearcher, S2STransformerBeamSearcher):
            scorer = None
            if scorers != "none":
                scorer = ScorerBuilder(
                    full_scorers=[CTCScorer(ctc_fc=ctc_lin, blank_index=0, eos_index=2),
                                  TransformerLMScorer(language_model=lm, temperature=1.0)],
                    weights={"ctc": 0.4, "transformerlm": 0.6},
                )
            searcher = cls(
                modules=[model, seq_lin], bos_index=1, eos_index=2, min_decode_ratio=0.0,
                max_decode_ratio=tokens / memory.shape[1], beam_size=beam,
                using_eos_threshold=False, length_normalization=True, scorer=scorer,
            )
            with torch.no_grad():
                run = lambda s=searcher: s(memory, wav_len)  # noqa: E731
                results[cls.__name__] = best_time(run, 1, device, warmup=False)
        cached, full = results["S2SMambaBeamSearcher"], results["S2STransformerBeamSearcher"]
        for name, sec in results.items():
            ratio = f"{full / cached:.1f}x faster" if name == "S2SMambaBeamSearcher" else ""
            print(f"| {name} | {beam} | {tokens} | {scorers} | {sec:.2f} | "
                  f"{1e3 * sec / tokens:.1f} | {ratio} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--positions", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--hyps", type=int, default=10, help="batch x beam for part 1")
    parser.add_argument("--frames", type=int, default=250, help="encoder frames (10 s)")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--search-tokens", type=int, default=100,
                        help="tokens of the whole beam search (0: skip it)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.search_tokens < 0 or min(args.positions) < 1:
        parser.error(f"--search-tokens must be >= 0 and --positions >= 1; got "
                     f"{args.search_tokens} and {args.positions}")
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_model, layers, d_ffn = SIZES[args.size]
    model = TransformerASR(
        VOCAB, 640, d_model, 4, 1, layers, d_ffn, 0.0, torch.nn.GELU,
        encoder_module="conmamba", decoder_module="mamba", attention_type="RelPosMHAXL",
        normalize_before=True, causal=False, mamba_config=MAMBA_CONFIG,
    ).to(args.device).eval()
    seq_lin = Linear(input_size=d_model, n_neurons=VOCAB).to(args.device)
    where = (torch.cuda.get_device_name() if args.device == "cuda" else
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# Mamba decoder ({args.size}: d_model {d_model}, {layers} layers), fp32, "
          f"{args.device} ({where}), encoder frames {args.frames}")
    memory = torch.randn(args.hyps, args.frames, d_model, device=args.device)
    print(f"\n## one decoding step, {args.hyps} hypotheses\n")
    decoder_steps(model, memory, args.positions, args.device)
    if args.search_tokens == 0:
        return
    print(f"\n## whole beam search, 1 utterance, beam {args.beam}\n")
    whole_search(model, seq_lin, memory[:1], args.beam, args.search_tokens, args.device)


if __name__ == "__main__":
    main()
