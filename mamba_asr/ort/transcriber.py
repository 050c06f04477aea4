"""Transcribe with an export folder's ONNX files through onnxruntime: the transcripts of
:class:`mamba_asr.transcriber.Transcriber` without PyTorch.

Usage:
    from mamba_asr.ort.transcriber import OnnxTranscriber
    asr = OnnxTranscriber.from_folder("models/demo-ctc")          # quantized=True: int8
    for t in asr.transcribe(["a.wav", "b.mp3"]):                  # also (array, rate) pairs
        print(t.text, t.words[0].start)

``features.onnx`` (waveform -> filterbanks) then ``model.onnx`` (or ``model.int8.onnx``:
filterbanks -> CTC log-probabilities) run on length-sorted, padded batches of the files up to
60 s; a ConMamba model takes a longer file in one pass (VAD segments beyond
``max_pass_seconds``), other encoders VAD segments of at most 30 s. Decoding (greedy or prefix
beam search, as the model's test search) and word times by forced alignment run in NumPy
(:mod:`mamba_asr.ort.ctc`), stretch by stretch between pauses, as the PyTorch path does.
:meth:`OnnxTranscriber.from_folder` gives S2S folders to
:class:`mamba_asr.ort.s2s_transcriber.OnnxS2STranscriber`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from mamba_asr.ctc_words import word_targets
from mamba_asr.model_card import CARD_FILE, verify_folder
from mamba_asr.ort import audio, ctc, vad
from mamba_asr.ort.s2s import ENCODER_FILE as S2S_ENCODER_FILE
from mamba_asr.transcribing import (
    MAX_BATCH_SECONDS,
    MAX_PASS_SECONDS,
    SEARCHES,
    SEGMENT_SECONDS,
    BatchingTranscriber,
    Piece,
)
from mamba_asr.transcript import Word

# The ONNX files of an export folder (written by mamba_asr.onnx_export, which takes these names)
FEATURES_FILE = "features.onnx"
MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model.int8.onnx"
TOKENS_FILE = "tokens.txt"
HPARAMS_FILE = "hyperparams.yaml"
BLANK_SYMBOL = "<blk>"
WORD_SEPARATOR = "\u2581"  # "▁", sentencepiece's and sherpa-onnx's word boundary
REQUIRED_METADATA = ("model_type", "vocab_size", "blank_id", "sample_rate",
                     "output_frame_seconds")
# SpeechBrain's CTCPrefixBeamSearcher defaults, for a folder without the model's own options
BEAM_DEFAULTS = {"beam_size": 100, "beam_prune_logp": -10.0, "token_prune_min_logp": -5.0,
                 "prune_history": True}


class OnnxFolderTranscriber(BatchingTranscriber):
    """What the transcribers of an ONNX export folder share: features.onnx, the model graph's
    metadata_props and tokens.txt."""

    audio = audio
    vad = vad

    def _open(self, folder: str | Path, model_name: str, options: onnxruntime.SessionOptions,
              required: tuple[str, ...] = REQUIRED_METADATA) -> onnxruntime.InferenceSession:
        """The session of ``folder``'s graph ``model_name`` (features.onnx's too); sets the
        model facts of its metadata (ValueError naming a missing key) and the labels."""
        self.folder = Path(folder)
        model_file = self.folder / model_name
        self.features = _session(self.folder / FEATURES_FILE, options)
        model = _session(model_file, options)
        meta = model.get_modelmeta().custom_metadata_map
        missing = [key for key in required if key not in meta]
        if missing:
            raise ValueError(f"{model_file}: metadata_props lack {', '.join(missing)}; "
                             "expected an export.py --format onnx model")
        self.metadata = dict(meta)
        self.model_type = meta["model_type"]
        self.sample_rate = int(meta["sample_rate"])
        self.frame_seconds = float(meta["output_frame_seconds"])
        self.blank = int(meta["blank_id"])
        self.labels = read_tokens(self.folder / TOKENS_FILE, int(meta["vocab_size"]),
                                  meta.get("word_separator", WORD_SEPARATOR))
        return model

    def _padded(self, batch: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
        """The pieces' waveforms zero-padded (B, S) float32 and their lengths (B,) int64."""
        lengths = np.array([len(p.wav) for p in batch], dtype=np.int64)
        wavs = np.zeros((len(batch), self._batch_width(lengths.tolist())), dtype=np.float32)
        for row, piece in enumerate(batch):
            wavs[row, : len(piece.wav)] = piece.wav
        return wavs, lengths


class OnnxTranscriber(OnnxFolderTranscriber):
    """A CTC model's ONNX export ready to transcribe files and waveforms (module docstring)."""

    def __init__(
        self,
        folder: str | Path,
        quantized: bool = False,
        search: str = "default",
        beam_size: int | None = None,
        max_pass_seconds: float = MAX_PASS_SECONDS,
        max_batch_seconds: float = MAX_BATCH_SECONDS,
        segment_seconds: float = SEGMENT_SECONDS,
        one_pass: bool | None = None,
        threads: int | None = None,
    ) -> None:
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, not {search!r}")
        self.model = self._open(folder, QUANTIZED_FILE if quantized else MODEL_FILE,
                                session_options(threads))
        self.lab2ind = {label: i for i, label in enumerate(self.labels)}
        self._special_labels = [lab for lab in self.labels if len(lab) > 1]
        self.max_batch_seconds = max_batch_seconds
        if one_pass is None:  # linear in length: ConMamba encoders
            one_pass = self.model_type.startswith("conmamba")
        self.one_pass = one_pass
        self.max_pass_seconds = max_pass_seconds
        self.segment_seconds = max_pass_seconds if self.one_pass else segment_seconds
        beam_options, default_beam = search_options(self.folder / HPARAMS_FILE)
        self.ctc_beam: ctc.PrefixBeamSearch | None = None
        if search == "beam" or (search == "default" and default_beam) or beam_size is not None:
            if beam_size is not None:
                beam_options["beam_size"] = beam_size
            self.ctc_beam = ctc.PrefixBeamSearch(self.labels, self.blank, **beam_options)

    @classmethod
    def from_folder(cls, folder: str | Path, quantized: bool = False, no_lm: bool = False,
                    **options: Any) -> Any:
        """An export folder with ONNX files (``export.py --format onnx``), checksums verified
        when it has a model card (CardError if a file changed). S2S folders (their card, or
        ``encoder.onnx`` without a card) give an
        :class:`mamba_asr.ort.s2s_transcriber.OnnxS2STranscriber`; ``no_lm``: decode them
        without their LM."""
        folder = Path(folder)
        family = "S2S" if (folder / S2S_ENCODER_FILE).is_file() else "CTC"
        if (folder / CARD_FILE).is_file():
            family = verify_folder(folder).get("family")
            if family not in ("CTC", "S2S"):
                raise ValueError(f"{folder}: a {family} model; the onnxruntime backend runs "
                                 "CTC and S2S models")
        if family == "S2S":
            from mamba_asr.ort.s2s_transcriber import OnnxS2STranscriber

            return OnnxS2STranscriber(folder, quantized=quantized, no_lm=no_lm, **options)
        if no_lm:
            raise ValueError(f"{folder}: a CTC model; no_lm is for S2S models")
        return cls(folder, quantized=quantized, **options)

    # ------------------------------------------------------------------ the model

    def log_probs(self, wavs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CTC log-probabilities (B, T', V) and their lengths (B,) of padded waveforms (B, S)
        of ``lengths`` samples."""
        feats, feat_lens = self.features.run(
            None, {"waveform": wavs.astype(np.float32, copy=False),
                   "waveform_lengths": lengths.astype(np.int64)})
        log_probs, out_lens = self.model.run(
            None, {"features": feats, "feature_lengths": feat_lens})
        return log_probs, out_lens

    def _transcribe_batch(self, batch: list[Piece]) -> list[list[Word]]:
        wavs, lengths = self._padded(batch)
        log_probs, frames = self.log_probs(wavs, lengths)
        return [self._ctc_words(log_probs[i, : frames[i]], piece.offset)
                for i, piece in enumerate(batch)]

    def _one_pass(self, wav: np.ndarray, offset: float) -> list[Word]:
        log_probs, frames = self.log_probs(wav[None], np.array([len(wav)], dtype=np.int64))
        return self._ctc_words(log_probs[0, : frames[0]], offset)

    # ------------------------------------------------------------------ decoding

    def _is_blank(self, log_probs: np.ndarray) -> np.ndarray:
        return log_probs.argmax(axis=-1) == self.blank

    def _decode(self, log_probs: np.ndarray) -> str:
        if self.ctc_beam is not None:
            return self.ctc_beam.search(log_probs)
        return "".join(self.labels[i] for i in ctc.greedy_decode(log_probs, self.blank))

    def _align(self, log_probs: np.ndarray, words: list[str], offset: float) -> list[Word]:
        if not words:
            return []
        tokens, spans = word_targets(words, lambda w: [self.lab2ind[c] for c in w],
                                     self.lab2ind[" "])
        return ctc.align_words(log_probs, words, tokens, spans, self.blank, self.frame_seconds,
                               offset)


def session_options(threads: int | None) -> onnxruntime.SessionOptions:
    """onnxruntime's session options, ``threads`` intra-op threads (None: its default).

    Memory patterns are off: with them a session keeps the arena of its largest input and
    adds another for the next long one (a second 10-minute file doubled the peak), at no
    measurable speed gain here.
    """
    options = onnxruntime.SessionOptions()
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    return options


def _session(path: Path, options: onnxruntime.SessionOptions) -> onnxruntime.InferenceSession:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; export the model with "
                                "export.py --format onnx")
    return onnxruntime.InferenceSession(str(path), sess_options=options,
                                        providers=["CPUExecutionProvider"])


def read_tokens(path: Path, vocab_size: int, separator: str) -> list[str]:
    """The labels of ``tokens.txt`` (sherpa-onnx's ``<symbol> <id>`` lines, ids 0..V-1), the
    word separator ``separator`` read as the space of a character model."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; export the model with "
                                "export.py --format onnx")
    labels: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        symbol, _, index = line.rstrip("\n").rpartition(" ")
        if not symbol or not index.isdigit() or int(index) != len(labels):
            raise ValueError(f"{path}, line {number}: {line!r}; expected '<symbol> "
                             f"{len(labels)}' (one symbol per id, in order)")
        labels.append(" " if symbol == separator else symbol)
    if len(labels) != vocab_size:
        raise ValueError(f"{path}: {len(labels)} symbols; the model has {vocab_size} outputs")
    return labels


def search_options(hparams: Path) -> tuple[dict[str, Any], bool]:
    """The CTC prefix beam search options of an export folder's ``hyperparams.yaml``
    (``ctc_beam_search``) and whether its test search is the beam search (its
    ``decoding_function``); SpeechBrain's defaults and greedy search without the file."""
    options = dict(BEAM_DEFAULTS)
    if not hparams.is_file():
        return options, False
    from ruamel.yaml import YAML  # reads the tags without building their objects

    config = YAML(typ="rt").load(hparams.read_text(encoding="utf-8")) or {}
    beam = config.get("ctc_beam_search") or {}
    options.update({key: beam[key] for key in BEAM_DEFAULTS if key in beam})
    function = config.get("decoding_function")
    tag = getattr(getattr(function, "tag", None), "value", None) or ""
    return options, tag.endswith("CTCPrefixBeamSearcher")
