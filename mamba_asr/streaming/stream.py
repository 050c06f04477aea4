"""One live transcription: audio in as it arrives, words out as soon as they are final.

    stream = Transcriber.from_folder("models/demo-stream").stream()
    for chunk in chunks:                      # any sizes, 16-kHz float samples
        update = stream.feed(chunk)
        print(update.words, update.partial)   # newly final words, the unfinished tail
    transcript = stream.finish()              # the final text with aligned word times

The front-end (:mod:`.frontend`) and the encoder (:mod:`.conmamba`, :mod:`.conformer`) carry
their state between chunks, so a causal ConMamba model's log-probabilities are those of the
whole recording at a constant cost per chunk. Greedy CTC decoding runs frame by frame: a word
is final once the space after it, or a pause (``PAUSE_SECONDS`` of blanks), has been emitted.
``finish`` decodes and aligns the whole stream's log-probabilities as an offline transcription
of the recording does, so its transcript is the offline one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from mamba_asr.streaming.conmamba import ConmambaStreamer, conmamba_problem
from mamba_asr.streaming.frontend import FrontendStreamer, frontend_problem
from mamba_asr.transcribing import MIN_BATCH_SECONDS, PAUSE_SECONDS, in_order
from mamba_asr.transcript import Transcript, Word

if TYPE_CHECKING:
    from mamba_asr.transcriber import Transcriber

__all__ = ["EncoderStreamer", "Stream", "StreamUpdate", "make_encoder_streamer",
           "pcm16_to_float", "stream_problem"]

# Audio run through the model per step: a long feed is split so memory stays bounded.
MAX_STEP_SECONDS = 2.0


class EncoderStreamer(Protocol):
    """An encoder that takes front-end frames as they come (see the module docstring)."""

    lookahead_frames: int  # encoder frames it waits for beyond its input
    chunk_frames: int  # encoder frames it needs before it computes

    def step(self, src: Tensor) -> Tensor:
        """src (1, L, F) flattened front-end frames -> (1, L', d_model) outputs now computable."""

    def flush(self) -> Tensor | None:
        """End of stream: the outputs of the frames still held (1, L'', d_model), or None."""


def make_encoder_streamer(transformer: Any) -> EncoderStreamer:
    """The streamer of a ``TransformerASR``'s encoder (ValueError when it cannot stream)."""
    kind = getattr(transformer, "encoder_module", None)
    if kind == "conformer":
        from mamba_asr.streaming.conformer import ConformerStreamer

        return ConformerStreamer(transformer)
    return ConmambaStreamer(transformer)


def stream_problem(hparams: Any, family: str) -> str | None:
    """Why a model (its inference hparams) cannot stream, or None when it can."""
    if family != "CTC":
        return f"it is a {family} model: streaming is for CTC models"
    problem = frontend_problem(hparams.compute_features, hparams.normalize, hparams.CNN)
    if problem is not None:
        return problem
    if getattr(hparams.Transformer, "encoder_module", None) == "conformer":
        return None  # the Conformer streamer checks its chunk configuration itself
    return conmamba_problem(hparams.Transformer)


@dataclass
class StreamUpdate:
    """What one ``feed`` changed."""

    words: list[Word]  # words whose final form became known, in stream time (s)
    partial: str  # the unfinished tail of the hypothesis ('' when none)
    seconds: float  # audio received so far
    timings: dict[str, float] = field(default_factory=dict)


class Stream:
    """A live transcription with one model (see the module docstring)."""

    def __init__(self, transcriber: Transcriber) -> None:
        h = transcriber.hparams
        problem = stream_problem(h, transcriber.family)
        if problem is not None:
            raise ValueError(f"the model cannot stream: {problem}")
        self.transcriber = transcriber
        self.sample_rate: int = transcriber.sample_rate
        self.frame_seconds: float = transcriber.frame_seconds
        self._frontend = FrontendStreamer(h.compute_features, h.normalize, h.CNN)
        self._encoder = make_encoder_streamer(h.Transformer)
        self._ctc_lin = h.ctc_lin
        self._log_softmax = h.log_softmax
        self._device = transcriber.device
        self._log_probs: list[Tensor] = []
        self._frames = 0  # encoder frames decoded
        self._labels = transcriber.asr.tokenizer.ind2lab
        self._blank = transcriber.blank
        self._pause_frames = max(1, round(PAUSE_SECONDS / self.frame_seconds))
        self._previous = self._blank  # the last frame's greedy token
        self._blank_run = 0
        self._word = ""  # the unfinished word
        self._word_frames: list[tuple[int, float]] = []  # its emitting frames, max log-prob
        self._final: list[Word] = []
        self.finished = False

    # ------------------------------------------------------------------ properties

    @property
    def lookahead_seconds(self) -> float:
        """Audio past an encoder frame's time that it waits for (front-end look-ahead and,
        for chunked encoders, the rest of the chunk)."""
        frames = self._encoder.lookahead_frames + self._encoder.chunk_frames - 1
        return self._frontend.lookahead_samples / self.sample_rate + frames * self.frame_seconds

    @property
    def seconds(self) -> float:
        """Audio received so far."""
        return self._frontend.received / self.sample_rate

    @property
    def final_words(self) -> list[Word]:
        """The words made final so far (greedy decoding, frame times), in order."""
        return list(self._final)

    @property
    def partial(self) -> str:
        """The unfinished tail of the hypothesis."""
        return self._word

    @property
    def text(self) -> str:
        """The final words so far and the unfinished tail."""
        return " ".join([w.word for w in self._final] + ([self._word] if self._word else []))

    # ------------------------------------------------------------------ audio in

    def feed(self, samples: Tensor | np.ndarray | Any) -> StreamUpdate:
        """The next samples (1-D float, the model's sample rate, any number) -> the words they
        made final and the unfinished tail."""
        if self.finished:
            raise ValueError("the stream is finished: start a new one with .stream()")
        wav = torch.as_tensor(np.asarray(samples, dtype=np.float32)
                              if not isinstance(samples, Tensor) else samples).float()
        if wav.dim() > 1:
            if wav.dim() == 2 and 1 in wav.shape:
                wav = wav.reshape(-1)
            else:
                raise ValueError(f"feed takes mono samples (n,), got shape {tuple(wav.shape)}")
        start = time.perf_counter()
        words: list[Word] = []
        step = round(MAX_STEP_SECONDS * self.sample_rate)
        for lo in range(0, max(1, wav.numel()), step):
            words += self._run(self._frontend.feed(wav[lo:lo + step].to(self._device)))
        return StreamUpdate(words, self._word, self.seconds,
                            {"compute": time.perf_counter() - start})

    def finish(self) -> Transcript:
        """The end of the audio: the final transcript, decoded and aligned as an offline
        transcription of the whole recording is."""
        if self.finished:
            raise ValueError("the stream is finished: start a new one with .stream()")
        start = time.perf_counter()
        min_samples = round(MIN_BATCH_SECONDS * self.sample_rate)  # as offline: a few frames
        self._run(self._frontend.finish(min_samples), flush=True)
        self.finished = True
        duration = self.seconds
        log_probs = self.log_probs()
        words: list[Word] = []
        if log_probs.shape[0]:
            words = self.transcriber._ctc_words(log_probs, 0.0)
        words = in_order(sorted(words, key=lambda w: w.start), duration)
        spent = time.perf_counter() - start
        return Transcript(text=" ".join(w.word for w in words), duration=duration, words=words,
                          source="<stream>", timings={"finish": spent})

    def log_probs(self) -> Tensor:
        """The CTC log-probabilities (T, V) of the frames encoded so far."""
        if not self._log_probs:
            return torch.zeros(0, len(self._labels))
        return torch.cat(self._log_probs)

    # ------------------------------------------------------------------ model and decoding

    @torch.inference_mode()
    def _run(self, frames: Tensor, flush: bool = False) -> list[Word]:
        """Front-end frames (1, L, F', C) -> encoder -> CTC log-probs -> newly final words."""
        src = frames.flatten(2)  # (1, L, F' * C), as TransformerASR.encode flattens
        outs = [self._encoder.step(src)] if src.shape[1] else []
        if flush:
            tail = self._encoder.flush()
            if tail is not None:
                outs.append(tail)
        words: list[Word] = []
        for enc in outs:
            if enc.shape[1] == 0:
                continue
            log_probs = self._log_softmax(self._ctc_lin(enc).float())[0].cpu()  # (L, V)
            self._log_probs.append(log_probs)
            words += self._greedy(log_probs)
        if flush and self._word:
            words.append(self._close_word())
        return words

    def _greedy(self, log_probs: Tensor) -> list[Word]:
        """Frame-by-frame greedy CTC: the words the frames of ``log_probs`` made final."""
        best, tokens = log_probs.max(dim=-1)
        words: list[Word] = []
        for logp, token in zip(best.tolist(), tokens.tolist(), strict=True):
            frame = self._frames
            self._frames += 1
            if token == self._blank:
                self._blank_run += 1
                if self._blank_run == self._pause_frames and self._word:
                    words.append(self._close_word())  # a pause: no word spans it
            elif self._is_boundary(token):  # a space, or <bos>/<eos>: ends the word
                if self._word:
                    words.append(self._close_word())
            elif token == self._previous:  # the same character held
                self._word_frames.append((frame, logp))
            else:
                label = self._labels[token]
                self._word += label
                self._word_frames.append((frame, logp))
            if token != self._blank:
                self._blank_run = 0
            self._previous = token
        return words

    def _is_boundary(self, token: int) -> bool:
        label = self._labels[token]
        return label == " " or len(label) > 1

    def _close_word(self) -> Word:
        frames = self._word_frames
        word = Word(
            word=self._word,
            start=frames[0][0] * self.frame_seconds,
            end=(frames[-1][0] + 1) * self.frame_seconds,
            probability=math.exp(sum(lp for _, lp in frames) / len(frames)),
        )
        self._final.append(word)
        self._word, self._word_frames = "", []
        return word


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM -> float32 samples in [-1, 1)."""
    if len(data) % 2:
        raise ValueError(f"16-bit PCM needs an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
