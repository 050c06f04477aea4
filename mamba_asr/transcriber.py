"""Transcribe audio with an exported model (or a run, exported on the fly): text, word times.

Usage:
    from mamba_asr.transcriber import Transcriber
    asr = Transcriber.from_folder("models/demo-ctc", device="cpu")
    for t in asr.transcribe(["a.wav", "b.mp3"]):          # also (waveform, sample_rate) pairs
        print(t.text, t.words[0].start, t.words[0].end)

The model is loaded by SpeechBrain's own ``EncoderASR`` (CTC) or ``EncoderDecoderASR`` (S2S)
after the folder's checksums are verified; this class runs its modules itself so that long
files stay linear:

- Files up to ``batch_file_seconds`` go through in length-sorted, padded batches of at most
  ``max_batch_seconds`` of audio, exactly as the recipes' test stage runs utterances.
- A CTC model with a ConMamba encoder (linear in time and memory) transcribes a longer file in
  ONE pass up to ``max_pass_seconds``: features and CNN front-end in overlapping chunks
  (exact), the encoder over the whole file, then decoding and alignment per stretch between
  long pauses (``mamba_asr.alignment.split_at_blanks``).
- Beyond ``max_pass_seconds``, and always for attention encoders (Conformer) and attention
  decoders (S2S), long files are split at pauses by a voice-activity detector (silero-vad)
  into segments of at most ``segment_seconds`` (``max_pass_seconds`` for ConMamba CTC
  models), transcribed as utterances; times stay in the file's time.

Word times come from CTC forced alignment of the hypothesis on the CTC posteriors (S2S: its
CTC head), ``mamba_asr.alignment``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from speechbrain.decoders.ctc import CTCPrefixBeamSearcher, ctc_greedy_decode
from speechbrain.inference.ASR import EncoderASR, EncoderDecoderASR

from mamba_asr import alignment, audio_io, long_audio, vad
from mamba_asr.model_card import CARD_FILE, verify_folder
from mamba_asr.streaming import Stream
from mamba_asr.transcribing import (  # noqa: F401  (re-exported: the command's defaults)
    MAX_BATCH_SECONDS,
    MAX_PASS_SECONDS,
    SEARCHES,
    SEGMENT_SECONDS,
    BatchingTranscriber,
    Piece,
)
from mamba_asr.transcribing import in_order as _in_order  # noqa: F401
from mamba_asr.transcript import Word

logger = logging.getLogger(__name__)

AudioInput = str | Path | tuple[torch.Tensor, int]


def normalizer_lengths(frames: torch.Tensor, total: int) -> torch.Tensor:
    """Relative lengths (B,) from which SpeechBrain's normalisers count exactly ``frames`` (B,)
    valid frames of ``total``.

    They count the frames below ``relative * total - 1e-6``, and ``frames / total * total``
    can come out one float32 step above ``frames`` (120 / 215 * 215 = 120.0000076): the first
    padding frame then enters the row's statistics and the row is normalised unlike alone or
    in features.onnx/model.onnx, which take integer lengths. Half a frame short leaves a
    margin of half a frame instead of one float32 step.
    """
    return (frames - 0.5) / total


class Transcriber(BatchingTranscriber):
    """An ASR model ready to transcribe files and waveforms (see the module docstring)."""

    audio = audio_io
    vad = vad

    def __init__(
        self,
        asr: EncoderASR | EncoderDecoderASR,
        card: dict[str, Any],
        search: str = "default",
        beam_size: int | None = None,
        no_lm: bool = False,
        max_pass_seconds: float = MAX_PASS_SECONDS,
        max_batch_seconds: float = MAX_BATCH_SECONDS,
        segment_seconds: float = SEGMENT_SECONDS,
        one_pass: bool | None = None,
    ) -> None:
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, not {search!r}")
        self.asr = asr
        self.card = card
        self.hparams = asr.hparams
        self.device = asr.device
        self.family: str = card["family"]
        self.sample_rate: int = int(card["sample_rate"])
        self.frame_seconds: float = float(card["output_frame_seconds"])
        self.blank: int = int(self.hparams.blank_index)
        self.max_batch_seconds = max_batch_seconds
        encoder = getattr(self.hparams.Transformer, "encoder_module", "transformer")
        if one_pass is None:  # linear in length: ConMamba encoders with a CTC head
            one_pass = self.family == "CTC" and encoder == "conmamba"
        elif one_pass and self.family != "CTC":
            raise ValueError("one_pass is for CTC models (S2S decoders see VAD segments)")
        self.one_pass = one_pass
        self.max_pass_seconds = max_pass_seconds
        self.segment_seconds = max_pass_seconds if self.one_pass else segment_seconds
        self._set_search(search, beam_size, no_lm)
        # CTC character models: labels that are not characters (<bos>, <eos>) are dropped
        labels = getattr(asr.tokenizer, "lab2ind", {}) if self.family == "CTC" else {}
        self._special_labels = [lab for lab in labels if len(lab) > 1]

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu", **options: Any) -> Transcriber:
        """A model exported by ``export.py``, checksums verified (CardError if a file changed)."""
        card = verify_folder(folder)
        loader = EncoderDecoderASR if card["family"] == "S2S" else EncoderASR
        asr = loader.from_hparams(
            source=str(folder), savedir=str(folder), run_opts={"device": device}
        )
        if card["family"] == "CTC":
            asr.tokenizer.expect_len(asr.hparams.ctc_lin.w.out_features)
        return cls(asr, card, **options)

    @classmethod
    def from_run(cls, run: str | Path, device: str = "cpu", no_lm: bool = False,
                 **options: Any) -> Transcriber:
        """A training run's averaged best checkpoints, exported to a temporary folder (removed
        once loaded; nothing is written into the run)."""
        from mamba_asr.export import export_model
        from mamba_asr.trained import load_trained, relocated_overrides

        run = Path(run)
        model = load_trained(str(run / "hyperparams.yaml"), [str(run / "save")],
                             [*relocated_overrides(run), "--device", device], no_lm=no_lm)
        with tempfile.TemporaryDirectory(prefix="mamba-asr-export-") as tmp:
            export_model(model, Path(tmp) / run.name, no_lm=no_lm)
            return cls.from_folder(Path(tmp) / run.name, device=device, no_lm=no_lm, **options)

    @classmethod
    def load(cls, model: str | Path, device: str = "cpu", **options: Any) -> Transcriber:
        """An export folder (``model_card.json``) or a run folder (``hyperparams.yaml`` +
        ``save/``)."""
        path = Path(model)
        if (path / CARD_FILE).is_file() or not (path / "save").is_dir():
            return cls.from_folder(path, device=device, **options)
        return cls.from_run(path, device=device, **options)

    def _set_search(self, search: str, beam_size: int | None, no_lm: bool) -> None:
        """The decoder: CTC greedy / prefix beam search; S2S beam search with or without LM."""
        h = self.hparams
        self.ctc_beam: CTCPrefixBeamSearcher | None = None
        self.decoder = None
        if self.family == "CTC":
            default_beam = isinstance(h.decoding_function, type)  # a searcher class, not greedy
            use_beam = search == "beam" or (search == "default" and default_beam)
            if use_beam or beam_size is not None:
                options = dict(h.ctc_beam_search)
                if beam_size is not None:
                    options["beam_size"] = beam_size
                vocab = [self.asr.tokenizer.ind2lab[i] for i in range(len(self.asr.tokenizer))]
                self.ctc_beam = CTCPrefixBeamSearcher(vocab_list=vocab, **options)
            return
        if search == "greedy":
            raise ValueError("S2S models decode by beam search only (search 'beam' or 'default')")
        if no_lm and not hasattr(h, "decoder_no_lm"):
            logger.info("the model has no LM: --no_lm changes nothing")
        decoder = getattr(h, "decoder_no_lm", h.decoder) if no_lm else h.decoder
        self.decoder = decoder.to(self.device).eval()
        if beam_size is not None:
            self.decoder.beam_size = beam_size

    # ------------------------------------------------------------------ streaming

    def stream(self) -> Stream:
        """A live transcription with this model (:mod:`mamba_asr.streaming`): ``feed`` audio
        as it arrives, get words as they become final, ``finish`` for the final transcript.
        ValueError naming the reason when the model cannot stream (a bidirectional encoder,
        per-utterance feature statistics, an S2S model)."""
        return Stream(self)

    # ------------------------------------------------------------------ transcription

    @torch.no_grad()
    def _transcribe_batch(self, batch: list[Piece]) -> list[list[Word]]:
        """Words (in file time) of each piece, padded into one batch."""
        lengths = torch.tensor([len(p.wav) for p in batch])
        width = self._batch_width(lengths.tolist())
        wavs = torch.zeros(len(batch), width)
        for row, piece in enumerate(batch):
            wavs[row, : len(piece.wav)] = piece.wav
        wavs = wavs.to(self.device)
        h = self.hparams
        feats = h.compute_features(wavs)
        # each row's own number of feature frames (centred STFT: samples // hop + 1), relative
        # to the batch's: as the ONNX graphs count them (features.onnx), so both backends mask
        # a padded row alike
        hop = int(h.compute_features.compute_STFT.hop_length)
        feat_frames = lengths // hop + 1
        wav_lens = (feat_frames / feats.shape[1]).to(self.device)
        feats = h.normalize(feats, normalizer_lengths(feat_frames, feats.shape[1]).to(self.device))
        enc = h.Transformer.encode(h.CNN(feats), wav_lens)
        log_probs = h.log_softmax(h.ctc_lin(enc).float()).cpu()
        frames = torch.round(wav_lens.cpu() * log_probs.shape[1]).int()
        if self.family == "S2S":
            tokens, _, _, _ = self.decoder(enc, wav_lens)
            texts = [self.asr.tokenizer.decode_ids(t) for t in tokens]
            return [
                self._align(log_probs[i, : frames[i]], texts[i].split(), piece.offset)
                for i, piece in enumerate(batch)
            ]
        return [self._ctc_words(log_probs[i, : frames[i]], piece.offset)
                for i, piece in enumerate(batch)]

    @torch.no_grad()
    def _one_pass(self, wav: torch.Tensor, offset: float) -> list[Word]:
        """A ConMamba CTC model over the whole file: chunked front-end, one encoder pass."""
        h = self.hparams
        # no reference kept to the front-end's output: the encoder frees it once projected
        enc = h.Transformer.encode(
            long_audio.frontend(h.compute_features, h.normalize, h.CNN,
                                wav.unsqueeze(0).to(self.device)),
            torch.ones(1, device=self.device),
        )
        log_probs = h.log_softmax(h.ctc_lin(enc).float())[0].cpu()
        del enc
        return self._ctc_words(log_probs, offset)

    def _is_blank(self, log_probs: torch.Tensor) -> np.ndarray:
        return (log_probs.argmax(dim=-1) == self.blank).numpy()

    def _decode(self, log_probs: torch.Tensor) -> str:
        if self.ctc_beam is not None:
            return self.ctc_beam(log_probs.unsqueeze(0), torch.ones(1))[0][0].text
        ids = ctc_greedy_decode(log_probs.unsqueeze(0), torch.ones(1), blank_id=self.blank)[0]
        return "".join(self.asr.tokenizer.decode_ndim(ids))

    def _align(self, log_probs: torch.Tensor, words: list[str], offset: float) -> list[Word]:
        """Word times of ``words`` on the CTC log-probabilities (T, V) of their audio."""
        if not words:
            return []
        if self.family == "CTC":
            lab2ind = self.asr.tokenizer.lab2ind
            tokens, spans = alignment.word_targets(
                words, lambda w: [lab2ind[c] for c in w], lab2ind[" "]
            )
        else:
            sp = self.asr.tokenizer
            tokens, spans = alignment.word_targets(words, sp.encode_as_ids, None)
        return alignment.align_words(
            log_probs, words, tokens, spans, self.blank, self.frame_seconds, offset
        )

