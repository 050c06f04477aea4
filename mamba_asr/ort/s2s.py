"""The decoders of an S2S model's ONNX export as step functions of a NumPy beam search.

Each adapter wraps onnxruntime sessions of the export folder (file names below, written by
:mod:`mamba_asr.onnx_s2s`) behind one interface (the search's ``StepDecoder``)::

    init(encoder_out (B, T', D), encoder_lengths (B,)) -> state of B items
    step(prefix (N, t) int64, bos first, state) -> logits (N, vocab), new state
    reorder(state, index (N',)) -> the state of items ``index``

- :class:`MambaStepDecoder`: decoder_init.onnx builds every layer's convolution and SSM
  states once; decoder_step.onnx feeds the prefix's last token, so a step costs the same at
  every position. States are (2L, N, ...) arrays, reordered along axis 1.
- :class:`TransformerStepDecoder`: decoder_step.onnx on the whole prefix and the encoder
  output (reordered along axis 0).
- :class:`LMStepDecoder`: lm.onnx on the whole prefix; no state.

``logits`` are the output layer's, before temperature and softmax.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime

ENCODER_FILE = "encoder.onnx"
ENCODER_INT8_FILE = "encoder.int8.onnx"
DECODER_INIT_FILE = "decoder_init.onnx"
DECODER_STEP_FILE = "decoder_step.onnx"
DECODER_STEP_INT8_FILE = "decoder_step.int8.onnx"
LM_FILE = "lm.onnx"

Session = onnxruntime.InferenceSession


class MambaStepDecoder:
    """Mamba decoder: state (conv_states (2L, N, Di, d_conv), ssm_states (2L, N, Di, N_s))."""

    def __init__(self, init: Session, step: Session) -> None:
        self.init_session = init
        self.step_session = step

    def init(self, encoder_out: np.ndarray, encoder_lengths: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        conv, ssm = self.init_session.run(None, {
            "encoder_out": encoder_out, "encoder_out_lengths": encoder_lengths.astype(np.int64)})
        return conv, ssm

    def step(self, prefix: np.ndarray, state: tuple[np.ndarray, np.ndarray]
             ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        tokens = prefix[:, -1].astype(np.int64)
        position = np.full(len(tokens), prefix.shape[1] - 1, dtype=np.int64)
        logits, conv, ssm = self.step_session.run(None, {
            "tokens": tokens, "position": position,
            "conv_states": state[0], "ssm_states": state[1]})
        return logits, (conv, ssm)

    @staticmethod
    def reorder(state: tuple[np.ndarray, np.ndarray], index: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        return np.take(state[0], index, axis=1), np.take(state[1], index, axis=1)


class TransformerStepDecoder:
    """Transformer decoder: state (encoder_out (N, T', D), encoder_lengths (N,))."""

    def __init__(self, step: Session) -> None:
        self.step_session = step

    def init(self, encoder_out: np.ndarray, encoder_lengths: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        return encoder_out, encoder_lengths.astype(np.int64)

    def step(self, prefix: np.ndarray, state: tuple[np.ndarray, np.ndarray]
             ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        (logits,) = self.step_session.run(None, {
            "tokens": prefix.astype(np.int64), "encoder_out": state[0],
            "encoder_out_lengths": state[1]})
        return logits, state

    @staticmethod
    def reorder(state: tuple[np.ndarray, np.ndarray], index: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        return np.take(state[0], index, axis=0), np.take(state[1], index, axis=0)


class LMStepDecoder:
    """Transformer LM on the prefix: no state."""

    def __init__(self, lm: Session) -> None:
        self.session = lm

    def init(self, encoder_out: np.ndarray, encoder_lengths: np.ndarray) -> None:
        return None

    def step(self, prefix: np.ndarray, state: Any) -> tuple[np.ndarray, None]:
        (logits,) = self.session.run(None, {"tokens": prefix.astype(np.int64)})
        return logits, None

    @staticmethod
    def reorder(state: Any, index: np.ndarray) -> None:
        return None


def pieces_to_text(pieces: list[str]) -> str:
    """SentencePiece pieces joined into text: ``▁`` starts a word."""
    return "".join(pieces).replace("\u2581", " ").strip()
