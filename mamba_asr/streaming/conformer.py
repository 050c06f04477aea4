"""A Dynamic-Chunk-Training Conformer encoder on a stream: SpeechBrain's chunked inference.

The encoder runs once per chunk of ``chunk_size`` encoder frames (the model's
``stream_chunk_size``, 8 frames = 320 ms in the streaming configurations), each layer
attending to its chunk and ``left_context`` chunks before it and convolving over 15 frames of
the past (SpeechBrain's ``TransformerASR.encode_streaming`` with the context of
``make_streaming_context``). Its outputs are those of the offline pass with the same chunk
configuration, ``transformer.encode(src, dynchunktrain_config=...)``; the cost of a chunk is
bounded by the left context, not by the length of the stream.
"""

from __future__ import annotations

from typing import Any

import torch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig
from torch import Tensor

__all__ = ["ConformerStreamer", "conformer_problem"]


def conformer_problem(
    transformer: Any, dct_config: DynChunkTrainConfig | None = None
) -> str | None:
    """Why this Conformer ``TransformerASR`` cannot stream with ``dct_config`` (default: its
    ``streaming_config``), or None when it can."""
    if not isinstance(getattr(transformer, "encoder", None), ConformerEncoder):
        return "its encoder is not a Conformer encoder"
    config = dct_config or getattr(transformer, "streaming_config", None)
    if config is None:
        return ("it has no streaming chunk configuration (a Dynamic Chunk Training Conformer "
                "has stream_chunk_size and stream_left_context: "
                "hparams/CTC/conformer_streaming_*.yaml)")
    if config.is_infinite_left_context():
        return "its streaming left context is unlimited: the cost per chunk would grow"
    if getattr(transformer, "causal", False):
        return "its Conformer is causal (SpeechBrain's chunked streaming needs causal: False)"
    if transformer.attention_type not in ("RelPosMHAXL", "regularMHA"):
        return f"its attention {transformer.attention_type!r} has no streaming path"
    return None


class ConformerStreamer:
    """Encoder outputs of a DCT-trained Conformer ``TransformerASR`` for front-end frames as
    they come (the contract's ``EncoderStreamer``).

    ``step`` buffers the frames until a chunk of ``chunk_frames`` is complete and encodes every
    complete chunk; ``flush`` encodes the last, partial one. Outputs are in eval mode (the
    caller sets ``transformer.eval()``) and equal
    ``transformer.encode(src, dynchunktrain_config=dct_config)`` of the whole input.
    """

    lookahead_frames = 0

    def __init__(self, transformer: Any, dct_config: DynChunkTrainConfig | None = None) -> None:
        problem = conformer_problem(transformer, dct_config)
        if problem is not None:
            raise ValueError(f"the model cannot stream: {problem}")
        self.transformer = transformer
        self.dct_config: DynChunkTrainConfig = dct_config or transformer.streaming_config
        self.chunk_frames: int = self.dct_config.chunk_size
        self.context = transformer.make_streaming_context(self.dct_config)
        self._held: Tensor | None = None  # (1, < chunk_frames, F) frames of the next chunk

    def step(self, src: Tensor) -> Tensor:
        """src (1, L, F) flattened front-end frames (or (1, L, C, F')) -> the encoder outputs
        (1, L', d_model) of the chunks they completed (L' a multiple of ``chunk_frames``)."""
        if src.dim() == 4:
            src = src.flatten(2)
        held = src if self._held is None else torch.cat([self._held, src], dim=1)
        complete = held.shape[1] - held.shape[1] % self.chunk_frames
        self._held = held[:, complete:]
        outs = [
            self.transformer.encode_streaming(held[:, lo : lo + self.chunk_frames], self.context)
            for lo in range(0, complete, self.chunk_frames)
        ]
        if not outs:
            return self._empty(held)
        return torch.cat(outs, dim=1)

    def flush(self) -> Tensor | None:
        """End of stream: the outputs (1, L'', d_model) of the partial chunk held, or None."""
        held, self._held = self._held, None
        if held is None or held.shape[1] == 0:
            return None
        return self.transformer.encode_streaming(held, self.context)

    def _empty(self, like: Tensor) -> Tensor:
        d_model = self.transformer.custom_src_module.layers[0].w.out_features  # the input Linear
        return like.new_zeros(like.shape[0], 0, d_model)
