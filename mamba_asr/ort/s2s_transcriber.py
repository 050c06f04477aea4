"""Transcribe with an S2S model's ONNX export through onnxruntime: the transcripts of
:class:`mamba_asr.transcriber.Transcriber` on S2S folders, without PyTorch.

Usage:
    from mamba_asr.ort.transcriber import OnnxTranscriber
    asr = OnnxTranscriber.from_folder("models/demo-s2s")      # an S2S folder: this class
    for t in asr.transcribe(["a.wav"]):
        print(t.text, t.words[0].start)

``features.onnx`` then ``encoder.onnx`` (``encoder.int8.onnx`` quantised) on length-sorted,
padded batches of files up to 30 s (longer files: voice-activity segments of at most 30 s,
as the torch backend cuts them for attention decoders); the test beam search of
``encoder.onnx``'s metadata (:mod:`mamba_asr.ort.s2s_search`) over the decoder's step graphs
(:mod:`mamba_asr.ort.s2s`), with ``lm.onnx`` when the folder fuses an LM; pieces joined into
text (``▁`` a space). Word times: CTC forced alignment of each word's SentencePiece encoding
(``tokenizer.ckpt``) on the CTC head, as the torch backend does.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mamba_asr.ctc_words import word_targets
from mamba_asr.ort import ctc
from mamba_asr.ort.s2s import (
    DECODER_INIT_FILE,
    DECODER_STEP_FILE,
    DECODER_STEP_INT8_FILE,
    ENCODER_FILE,
    ENCODER_INT8_FILE,
    LM_FILE,
    LMStepDecoder,
    MambaStepDecoder,
    TransformerStepDecoder,
    pieces_to_text,
)
from mamba_asr.ort.s2s_search import SearchOptions, beam_search
from mamba_asr.ort.transcriber import (
    REQUIRED_METADATA,
    OnnxFolderTranscriber,
    _session,
    session_options,
)
from mamba_asr.transcribing import (
    MAX_BATCH_SECONDS,
    MAX_PASS_SECONDS,
    SEARCHES,
    SEGMENT_SECONDS,
    Piece,
)
from mamba_asr.transcript import Word

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.ckpt"
# SentencePiece's text for its unknown piece (the id the recipes share with the CTC blank)
UNKNOWN_TEXT = " \u2047 "


class OnnxS2STranscriber(OnnxFolderTranscriber):
    """An S2S model's ONNX export ready to transcribe files and waveforms (module docstring)."""

    def __init__(
        self,
        folder: str | Path,
        quantized: bool = False,
        search: str = "default",
        beam_size: int | None = None,
        no_lm: bool = False,
        max_pass_seconds: float = MAX_PASS_SECONDS,
        max_batch_seconds: float = MAX_BATCH_SECONDS,
        segment_seconds: float = SEGMENT_SECONDS,
        one_pass: bool | None = None,
        threads: int | None = None,
    ) -> None:
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, not {search!r}")
        if search == "greedy":
            raise ValueError("S2S models decode by beam search only (search 'beam' or 'default')")
        if one_pass:
            raise ValueError("one_pass is for CTC models (S2S decoders see VAD segments)")
        options = session_options(threads)
        self.encoder = self._open(folder, ENCODER_INT8_FILE if quantized else ENCODER_FILE,
                                  options, (*REQUIRED_METADATA, "decoder_type"))
        self.options = SearchOptions.from_metadata(self.metadata)
        if beam_size is not None:
            self.options = dataclasses.replace(self.options, beam_size=beam_size)
        step_file = self.folder / (DECODER_STEP_INT8_FILE if quantized else DECODER_STEP_FILE)
        if self.options.decoder_type == "mamba":
            self.decoder: Any = MambaStepDecoder(
                _session(self.folder / DECODER_INIT_FILE, options), _session(step_file, options))
        else:
            self.decoder = TransformerStepDecoder(_session(step_file, options))
        self.lm: LMStepDecoder | None = None
        if self.options.has_lm and not no_lm:
            if (self.folder / LM_FILE).is_file():
                self.lm = LMStepDecoder(_session(self.folder / LM_FILE, options))
            else:
                logger.warning("%s: no %s; decoding without the model's LM", self.folder,
                               LM_FILE)
        self._tokenizer: Any = None
        self.max_batch_seconds = max_batch_seconds
        self.one_pass = False
        self.max_pass_seconds = max_pass_seconds
        self.segment_seconds = segment_seconds

    def encode(self, wavs: np.ndarray, lengths: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """encoder_out (B, T', D), its lengths (B,) and CTC log-probabilities (B, T', V) of
        padded waveforms (B, S) of ``lengths`` samples."""
        feats, feat_lens = self.features.run(
            None, {"waveform": wavs.astype(np.float32, copy=False),
                   "waveform_lengths": lengths.astype(np.int64)})
        enc, enc_lens, log_probs = self.encoder.run(
            None, {"features": feats, "feature_lengths": feat_lens})
        return enc, enc_lens, log_probs

    def text(self, tokens: list[int]) -> str:
        """The text of a hypothesis' tokens, as SentencePiece decodes them."""
        control = {self.options.bos_id, self.options.eos_id}
        return pieces_to_text([
            UNKNOWN_TEXT if t == self.blank else self.labels[t]
            for t in tokens if t not in control
        ])

    def _transcribe_batch(self, batch: list[Piece]) -> list[list[Word]]:
        wavs, lengths = self._padded(batch)
        enc, frames, log_probs = self.encode(wavs, lengths)
        hypotheses = beam_search(self.decoder, enc, frames, log_probs, self.options, self.lm)
        return [self._align(log_probs[i, : frames[i]], self.text(hypotheses[i]).split(),
                            piece.offset)
                for i, piece in enumerate(batch)]

    def _align(self, log_probs: np.ndarray, words: list[str], offset: float) -> list[Word]:
        if not words:
            return []
        tokens, spans = word_targets(words, self.tokenizer.encode_as_ids, None)
        return ctc.align_words(log_probs, words, tokens, spans, self.blank, self.frame_seconds,
                               offset)

    @property
    def tokenizer(self) -> Any:
        """The folder's SentencePiece model (``tokenizer.ckpt``), loaded on first use."""
        if self._tokenizer is None:
            import sentencepiece

            path = self.folder / TOKENIZER_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; word times need the folder's "
                                        "SentencePiece model")
            self._tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return self._tokenizer
