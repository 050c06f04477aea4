"""Mamba-decoder beam search from cached states equals SpeechBrain's recomputing search."""

from __future__ import annotations

import pytest
import torch
from speechbrain.decoders import CTCScorer, S2STransformerBeamSearcher, ScorerBuilder
from speechbrain.nnet.linear import Linear

from modules.beam_search import S2SMambaBeamSearcher
from modules.TransformerASR import TransformerASR

VOCAB, D_MODEL = 30, 32


@pytest.fixture(scope="module")
def model() -> tuple[TransformerASR, Linear, Linear]:
    torch.manual_seed(0)
    net = TransformerASR(
        VOCAB, 20, D_MODEL, 4, 2, 2, 64, encoder_module="conmamba", decoder_module="mamba",
        attention_type="RelPosMHAXL", normalize_before=True, causal=False, kernel_size=7,
        mamba_config={"d_state": 4, "expand": 2, "d_conv": 4, "bidirectional": True},
    ).eval()
    seq_lin = Linear(input_size=D_MODEL, n_neurons=VOCAB)
    ctc_lin = Linear(input_size=D_MODEL, n_neurons=VOCAB)
    # Make the end-of-sentence token unlikely so that hypotheses grow long.
    with torch.no_grad():
        seq_lin.w.bias[2] = -4.0
    return net, seq_lin, ctc_lin


def search(cls: type, net: TransformerASR, seq_lin: Linear, ctc_lin: Linear | None,
           enc: torch.Tensor, wav_len: torch.Tensor):
    scorer = None
    if ctc_lin is not None:
        ctc = CTCScorer(ctc_fc=ctc_lin, blank_index=0, eos_index=2)
        scorer = ScorerBuilder(full_scorers=[ctc], weights={"ctc": 0.4})
    searcher = cls(
        modules=[net, seq_lin], bos_index=1, eos_index=2, min_decode_ratio=0.0,
        max_decode_ratio=1.0, beam_size=4, using_eos_threshold=False, length_normalization=True,
        scorer=scorer,
    )
    with torch.no_grad():
        return searcher(enc, wav_len)


@pytest.mark.parametrize("with_ctc", [False, True])
def test_cached_search_equals_recomputing_search(model, with_ctc: bool) -> None:
    net, seq_lin, ctc_lin = model
    torch.manual_seed(1)
    feats = torch.randn(3, 24, 20)
    wav_len = torch.tensor([1.0, 0.75, 0.5])
    with torch.no_grad():
        enc = net.encode(feats, wav_len)
    ctc = ctc_lin if with_ctc else None
    hyps, lengths, scores, log_probs = search(S2SMambaBeamSearcher, net, seq_lin, ctc, enc, wav_len)
    ref_hyps, ref_lengths, ref_scores, _ = search(
        S2STransformerBeamSearcher, net, seq_lin, ctc, enc, wav_len
    )
    assert hyps == ref_hyps
    assert torch.equal(lengths, ref_lengths)
    assert torch.allclose(scores, ref_scores, atol=1e-4)
    assert max(len(h) for h in hyps) >= 5  # the comparison covers many steps
    again = search(S2SMambaBeamSearcher, net, seq_lin, ctc, enc, wav_len)
    assert again[0] == hyps and torch.equal(again[2], scores)
