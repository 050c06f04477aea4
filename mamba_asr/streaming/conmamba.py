"""A causal ConMamba encoder on a stream: every frame encoded as soon as it arrives."""

from __future__ import annotations

from torch import Tensor

from modules.Conmamba import ConmambaEncoder, EncoderState

__all__ = ["ConmambaStreamer", "conmamba_problem"]


def conmamba_problem(transformer: object) -> str | None:
    """Why this ConMamba ``TransformerASR`` cannot stream, or None when it can."""
    encoder = getattr(transformer, "encoder", None)
    if not isinstance(encoder, ConmambaEncoder):
        return "its encoder is not a ConMamba encoder"
    if not encoder.causal:
        return ("its ConMamba encoder is bidirectional (streaming configurations are causal: "
                "causal: True, hparams/CTC/conmamba_streaming_*.yaml)")
    adds_positions = (transformer.attention_type != "RelPosMHAXL"
                      and transformer.positional_encoding_type == "fixed_abs_sine")
    if adds_positions:
        return "its encoder input gets absolute positional encodings (limited to max_length)"
    return None


class ConmambaStreamer:
    """Encoder outputs of a causal ConMamba ``TransformerASR`` for front-end frames as they
    come: the same values as ``transformer.encode`` on the whole input, at a cost per frame
    that does not grow with the stream (each layer carries a fixed-size state)."""

    lookahead_frames = 0
    chunk_frames = 1

    def __init__(self, transformer: object) -> None:
        problem = conmamba_problem(transformer)
        if problem is not None:
            raise ValueError(f"the model cannot stream: {problem}")
        self.transformer = transformer
        self.encoder: ConmambaEncoder = transformer.encoder
        self.state: EncoderState | None = None

    def step(self, src: Tensor) -> Tensor:
        """src (1, L, F) flattened front-end frames -> encoder outputs (1, L, d_model)."""
        x = self.transformer.custom_src_module(src)
        if x.shape[1] == 0:
            return x
        if self.state is None:
            self.state = self.encoder.initial_state(x.shape[0], x)
        out, self.state = self.encoder.forward_chunk(x, self.state)
        return out

    def flush(self) -> Tensor | None:
        """Nothing is held back: None."""
        return None
