"""ONNX graphs of an S2S (joint CTC/attention) model folder, for a beam search outside PyTorch.

Files added to an export folder besides features.onnx and tokens.txt
(:mod:`mamba_asr.onnx_export`)::

    encoder.onnx        features (B, T, n_mels), feature_lengths (B,) -> encoder_out
                        (B, T', d_model), encoder_out_lengths (B,) int64, ctc_log_probs
                        (B, T', vocab): normaliser, CNN front-end, encoder, CTC head; the
                        model facts and the test beam search in its metadata_props
                        (:func:`search_metadata`)
    decoder_init.onnx   Mamba decoder: encoder_out, encoder_out_lengths -> conv_states
                        (2L, B, Di, d_conv), ssm_states (2L, B, Di, N): every layer's self and
                        cross Mamba state, [layer0.self, layer0.cross, layer1.self, ...], after
                        the cross Mambas consumed each item's valid encoder frames
    decoder_step.onnx   Mamba decoder: tokens (N,) int64, position (N,) int64 (0 for bos),
                        conv_states, ssm_states -> logits (N, vocab), new_conv_states,
                        new_ssm_states. Transformer decoder: tokens (N, t) (the prefix, bos
                        first), encoder_out (N, T', d_model), encoder_out_lengths (N,) ->
                        logits (N, vocab) at the last position
    lm.onnx             folders whose test search fuses a Transformer LM: tokens (N, t) ->
                        logits (N, vocab) at the last position
    *.int8.onnx         with ``quantize="int8"``: encoder and decoder_step, weights int8

``logits`` are the output layer's, before the search's temperature and softmax. Batch, time
and prefix length are dynamic; the states' batch is axis 1, so a beam reorder is one take
along it.
"""

from __future__ import annotations

import functools
from typing import Any
from unittest import mock

import torch
from speechbrain.decoders.scorer import CTCScorer, TransformerLMScorer
from speechbrain.inference.ASR import EncoderDecoderASR
from speechbrain.lobes.models.transformer import TransformerASR as sb_transformer_asr
from torch import Tensor, nn

from mamba_asr.onnx_export import (
    MIN_FRAMES,
    CTCGraph,
    Graph,
    OnnxExportError,
    _length_to_mask,
    feature_graph,
    metadata,
    tokens_text,
)
from mamba_asr.ort.s2s import DECODER_INIT_FILE, DECODER_STEP_FILE, ENCODER_FILE, LM_FILE
from modules.mamba.bimamba import MambaState

# The scorers the runtime's search fuses; others (coverage, length, n-gram) are refused.
SCORERS = ("ctc", "transformerlm")


class EncoderGraph(CTCGraph):
    """features (B, T, n_mels), feature_lengths (B,) -> encoder_out (B, T', d_model),
    encoder_out_lengths (B,), ctc_log_probs (B, T', vocab)."""

    def forward(self, features: Tensor, feature_lengths: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        enc, log_probs, lengths = self.encode(features, feature_lengths)
        return enc, lengths, log_probs


def _stack(states: list[tuple[MambaState, MambaState]]) -> tuple[Tensor, Tensor]:
    """Per-layer (self, cross) states -> conv (2L, B, Di, d_conv), ssm (2L, B, Di, N)."""
    flat = [s for layer in states for s in layer]
    return torch.stack([s.conv for s in flat]), torch.stack([s.ssm for s in flat])


def _unstack(conv: Tensor, ssm: Tensor) -> list[tuple[MambaState, MambaState]]:
    flat = [MambaState(conv[i], ssm[i]) for i in range(conv.shape[0])]
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


class MambaDecoderInitGraph(nn.Module):
    """encoder_out (B, T', D), encoder_out_lengths (B,) -> conv_states (2L, B, Di, d_conv),
    ssm_states (2L, B, Di, N): ``MambaDecoder.init_state``, stacked."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.decoder = transformer.decoder

    def forward(self, encoder_out: Tensor, encoder_out_lengths: Tensor) -> tuple[Tensor, Tensor]:
        return _stack(self.decoder.init_state(encoder_out, encoder_out_lengths))


class MambaDecoderStepGraph(nn.Module):
    """tokens (N,), position (N,), conv_states, ssm_states -> logits (N, vocab), new states:
    ``TransformerASR.decode_step`` with a position per item, then the output layer."""

    def __init__(self, transformer: nn.Module, seq_lin: nn.Module) -> None:
        super().__init__()
        self.embed = transformer.custom_tgt_module
        self.decoder = transformer.decoder
        self.seq_lin = seq_lin
        table = transformer.decoder_position_table()
        self.register_buffer("positions", None if table is None else table[0].clone())

    def forward(self, tokens: Tensor, position: Tensor, conv_states: Tensor,
                ssm_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tgt = self.embed(tokens.unsqueeze(1))  # (N, 1, D)
        if self.positions is not None:
            tgt = tgt + self.positions[position].unsqueeze(1).to(tgt.dtype)
        out, state = self.decoder.step(tgt, _unstack(conv_states, ssm_states))
        return (self.seq_lin(out[:, 0]), *_stack(state))


class TransformerDecoderStepGraph(nn.Module):
    """tokens (N, t), encoder_out (N, T', D), encoder_out_lengths (N,) -> logits (N, vocab)
    of the last position: SpeechBrain's ``decode`` of the prefix, then the output layer."""

    def __init__(self, transformer: nn.Module, seq_lin: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.seq_lin = seq_lin

    def forward(self, tokens: Tensor, encoder_out: Tensor, encoder_out_lengths: Tensor) -> Tensor:
        # decode's memory mask is as wide as the longest length; here as the encoder output
        mask = functools.partial(_length_to_mask, max_len=encoder_out.shape[1])
        with mock.patch.object(sb_transformer_asr, "length_to_mask", mask):
            pred, _ = self.transformer.decode(tokens, encoder_out, encoder_out_lengths)
        return self.seq_lin(pred[:, -1])


class LMGraph(nn.Module):
    """tokens (N, t) -> logits (N, vocab) of the last position (SpeechBrain TransformerLM)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm(tokens)[:, -1]


def load_s2s(folder: Any) -> EncoderDecoderASR:
    """The folder's model as SpeechBrain's ``EncoderDecoderASR`` loads it, on the CPU, eval."""
    asr = EncoderDecoderASR.from_hparams(source=str(folder), savedir=str(folder),
                                         run_opts={"device": "cpu"})
    asr.mods.eval()
    return asr


def search_metadata(searcher: Any, decoder_type: str) -> dict[str, str]:
    """The test beam search of a built SpeechBrain ``S2SBeamSearcher`` as metadata strings."""
    scorer = searcher.scorer
    scorers = {} if scorer is None else {**scorer.full_scorers, **scorer.partial_scorers}
    weights = {} if scorer is None else scorer.weights
    others = sorted(k for k in scorers if k not in SCORERS and weights.get(k, 0.0) > 0.0)
    if others:
        raise OnnxExportError(f"the test search's scorers {', '.join(others)} cannot be "
                              f"exported (expected only {', '.join(SCORERS)})")
    ctc = scorers.get("ctc")
    lm = scorers.get("transformerlm")
    if ctc is not None and not isinstance(ctc, CTCScorer):
        raise OnnxExportError(f"scorer 'ctc' is a {type(ctc).__name__}; expected CTCScorer")
    if lm is not None and not isinstance(lm, TransformerLMScorer):
        raise OnnxExportError(f"scorer 'transformerlm' is a {type(lm).__name__}; expected "
                              "TransformerLMScorer")
    has_lm = lm is not None and weights.get("transformerlm", 0.0) > 0.0
    flag = {True: "1", False: "0"}
    return {
        "decoder_type": decoder_type,
        "bos_id": str(int(searcher.bos_index)),
        "eos_id": str(int(searcher.eos_index)),
        "beam_size": str(int(searcher.beam_size)),
        "ctc_weight": repr(float(searcher.ctc_weight)),
        "lm_weight": repr(float(weights["transformerlm"]) if has_lm else 0.0),
        "temperature": repr(float(searcher.temperature)),
        "lm_temperature": repr(float(lm.temperature) if has_lm else 1.0),
        "min_decode_ratio": repr(float(searcher.min_decode_ratio)),
        "max_decode_ratio": repr(float(searcher.max_decode_ratio)),
        "length_normalization": flag[bool(searcher.length_normalization)],
        "using_eos_threshold": flag[bool(searcher.using_eos_threshold)],
        "eos_threshold": repr(float(searcher.eos_threshold)),
        "using_max_attn_shift": flag[bool(searcher.using_max_attn_shift)],
        "max_attn_shift": str(int(searcher.max_attn_shift)),
        "ctc_window_size": str(int(ctc.ctc_window_size) if ctc is not None else 0),
        "has_lm": flag[has_lm],
    }


def s2s_graphs(asr: EncoderDecoderASR) -> list[Graph]:
    """features, encoder, decoder (init and step, or the prefix step) and LM graphs."""
    h = asr.hparams
    transformer = h.Transformer
    vocab = int(h.seq_lin.w.out_features)
    decoder_type = getattr(transformer, "decoder_module", "transformer")
    encoder_type = getattr(transformer, "encoder_module", "transformer")
    searcher = asr.mods.decoder
    search = search_metadata(searcher, decoder_type)
    features = feature_graph(h)
    n_mels = int(h.compute_features.compute_fbanks.n_mels)
    hop = int(h.compute_features.compute_STFT.hop_length)
    batch = torch.export.Dim("batch")
    n_frames = 2 * int(h.sample_rate) // hop + 1
    encoder = EncoderGraph(h)
    info = metadata(h, encoder.normalize.description, vocab)
    info["model_type"] = f"{encoder_type}_{decoder_type}_s2s"
    graphs = [features, Graph(
        name=ENCODER_FILE.removesuffix(".onnx"), module=encoder,
        example=(torch.randn(2, n_frames, n_mels),
                 torch.tensor([n_frames, n_frames // 2], dtype=torch.int64)),
        inputs=("features", "feature_lengths"),
        outputs=("encoder_out", "encoder_out_lengths", "ctc_log_probs"),
        dynamic=({0: batch, 1: torch.export.Dim("frames", min=MIN_FRAMES)}, {0: batch}),
        metadata={**info, **search}, quantize=True,
    )]
    d_model = int(h.seq_lin.w.in_features)
    enc_frames = torch.export.Dim("encoder_frames", min=2)
    memory = (torch.randn(3, 13, d_model), torch.tensor([13, 9, 4], dtype=torch.int64))
    memory_axes = ({0: batch, 1: enc_frames}, {0: batch})
    step_name = DECODER_STEP_FILE.removesuffix(".onnx")
    if decoder_type == "mamba":
        init = MambaDecoderInitGraph(transformer)
        with torch.no_grad():
            conv, ssm = init(*memory)
        graphs.append(Graph(
            name=DECODER_INIT_FILE.removesuffix(".onnx"), module=init, example=memory,
            inputs=("encoder_out", "encoder_out_lengths"), outputs=("conv_states", "ssm_states"),
            dynamic=memory_axes,
        ))
        graphs.append(Graph(
            name=step_name, module=MambaDecoderStepGraph(transformer, h.seq_lin),
            example=(torch.tensor([1, 5, 7]), torch.tensor([0, 3, 1]), conv, ssm),
            inputs=("tokens", "position", "conv_states", "ssm_states"),
            outputs=("logits", "new_conv_states", "new_ssm_states"),
            dynamic=({0: batch}, {0: batch}, {1: batch}, {1: batch}), quantize=True,
        ))
    else:
        prefix = _prefix_dim(transformer)
        graphs.append(Graph(
            name=step_name, module=TransformerDecoderStepGraph(transformer, h.seq_lin),
            example=(torch.tensor([[1, 5, 7], [1, 4, 4], [1, 9, 3]]), *memory),
            inputs=("tokens", "encoder_out", "encoder_out_lengths"), outputs=("logits",),
            dynamic=({0: batch, 1: prefix}, *memory_axes), quantize=True,
        ))
    if search["has_lm"] == "1":
        graphs.append(Graph(
            name=LM_FILE.removesuffix(".onnx"), module=LMGraph(h.lm_model),
            example=(torch.tensor([[1, 5, 7], [1, 4, 4]]),), inputs=("tokens",),
            outputs=("logits",), dynamic=({0: batch, 1: _prefix_dim(h.lm_model)},),
        ))
    return graphs


def _prefix_dim(model: nn.Module) -> torch.export.Dim:
    """The dynamic prefix axis: at most the rows of the model's positional-encoding table."""
    rows = [m.pe.shape[1] for m in model.modules() if isinstance(getattr(m, "pe", None), Tensor)]
    return torch.export.Dim("prefix", max=min(rows)) if rows else torch.export.Dim("prefix")


def s2s_tokens(asr: EncoderDecoderASR) -> str:
    """tokens.txt of an S2S model: the SentencePiece pieces (``▁`` included), blank ``<blk>``."""
    sp = asr.tokenizer
    vocab = int(asr.hparams.seq_lin.w.out_features)
    if sp.get_piece_size() != vocab:
        raise OnnxExportError(f"the tokenizer has {sp.get_piece_size()} pieces, the decoder "
                              f"{vocab} outputs")
    ind2lab = {i: sp.id_to_piece(i) for i in range(vocab)}
    return tokens_text(ind2lab, int(asr.hparams.blank_index))
