"""A model's front-end on a stream: Fbank features, the feature normaliser and the CNN, computed
as the audio arrives, with exactly the values the whole recording gives.

Each stage is local in time with a bounded look-ahead, so the streamer keeps a little history
and emits a frame once everything it depends on has arrived:

- STFT frame ``t`` (hop ``h``, centred windows of ``n_fft`` samples) needs the samples up to
  ``t * h + n_fft / 2``; the stream starts with the ``n_fft / 2`` zeros a centred STFT pads
  with, and ``finish`` appends those of the end.
- The normaliser must use fixed (global) statistics.
- CNN output ``u`` (total stride ``S``, receptive field ``W`` frames, 'same' padding) needs the
  feature frames up to ``u * S + (W - 1) // 2``. Ready outputs are computed from a slice that
  starts a receptive field earlier on a multiple of ``S`` (so its frames are the whole input's)
  and the outputs that saw the slice's edges are dropped.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import spectral_magnitude
from torch import Tensor

from mamba_asr.long_audio import _stride_and_window

__all__ = ["FrontendStreamer", "frontend_problem"]


def frontend_problem(compute_features: Any, normalize: Any, cnn: Any) -> str | None:
    """Why this front-end cannot stream exactly, or None when it can."""
    if not isinstance(compute_features, Fbank):
        return f"its features are {type(compute_features).__name__}, not an Fbank"
    if compute_features.deltas or compute_features.context:
        return "its Fbank adds deltas or context frames"
    fbanks = compute_features.compute_fbanks
    if fbanks.log_mel and not math.isinf(fbanks.top_db):
        return (f"its Fbank floors each recording {fbanks.top_db:g} dB below its loudest bin "
                "(streaming configurations use modules.features.Fbank with top_db: null)")
    norm_type = getattr(normalize, "norm_type", None)
    if norm_type != "global":
        return (f"its feature normaliser uses {norm_type!r} statistics, which need the whole "
                "utterance (streaming needs norm_type: global)")
    try:
        _stride_and_window(cnn)
    except (TypeError, ValueError) as exc:
        return f"its CNN front-end: {exc}"
    return None


class FrontendStreamer:
    """``cnn(normalize(compute_features(wav)))`` of a growing waveform, frame by frame.

    ``feed(samples)`` returns the CNN frames (1, L, F', C) that became computable;
    ``finish()`` those of the end. Their concatenation equals the whole waveform's output.
    """

    def __init__(self, compute_features: Fbank, normalize: Any, cnn: torch.nn.Module) -> None:
        problem = frontend_problem(compute_features, normalize, cnn)
        if problem is not None:
            raise ValueError(f"the model cannot stream: {problem}")
        stft = compute_features.compute_STFT
        self.hop: int = stft.hop_length
        self.n_fft: int = stft.n_fft
        self._stft = copy.copy(stft)  # frames of the padded signal: no centring of its own
        self._stft.center = False
        self._fbanks = compute_features.compute_fbanks
        self._normalize = normalize
        self._cnn = cnn
        self.stride, window = _stride_and_window(cnn)
        self.reach = (window - 1) // 2  # feature frames a CNN output sees on each side
        self._margin = -(-self.reach // self.stride)  # CNN outputs spoilt by a slice's start
        pad = self.n_fft // 2 if stft.center else 0
        self._pad = pad
        device = next(cnn.parameters()).device
        self._samples = torch.zeros(pad, device=device)  # padded signal from _sample_base on
        self._sample_base = 0
        self._frames = 0  # feature frames computed
        self._feats = torch.zeros(1, 0, self._fbanks.n_mels, device=device)  # from _feat_base
        self._feat_base = 0
        self._outputs = 0  # CNN frames emitted
        self.received = 0  # samples fed
        self.finished = False

    @property
    def lookahead_samples(self) -> int:
        """Audio past a CNN frame's time that it waits for: output ``u``, at time
        ``u * S * hop`` samples (word times count so), is emitted once the samples up to
        ``u * S * hop`` plus this many have arrived (46 ms for the demo: 3 frames of 10 ms and
        half a 512-sample window)."""
        return self.reach * self.hop + self.n_fft - self._pad

    @torch.inference_mode()
    def feed(self, samples: Tensor) -> Tensor:
        """samples (n,) at the features' sample rate -> the newly computable CNN frames."""
        if self.finished:
            raise ValueError("the stream is finished: start a new one")
        samples = samples.reshape(-1).to(self._samples)
        self.received += samples.numel()
        self._samples = torch.cat([self._samples, samples])
        available = self._sample_base + self._samples.numel()  # padded samples
        ready = max(0, (available - self.n_fft) // self.hop + 1)  # STFT frames
        self._add_features(ready)
        ready_out = max(0, (self._frames - 1 - self.reach) // self.stride + 1)
        return self._cnn_frames(ready_out)

    @torch.inference_mode()
    def finish(self, min_samples: int = 0) -> Tensor:
        """The CNN frames of the end of the stream (the centred STFT's zero padding added).

        A stream shorter than ``min_samples`` is first padded with zeros to that length, as
        the offline transcriber pads a short clip (the CNN's padding needs a few frames), and
        only the frames of the real samples are returned.
        """
        if self.finished:
            raise ValueError("the stream is finished: start a new one")
        self.finished = True
        padded = max(self.received, min_samples)
        zeros = padded - self.received + self._pad
        self._samples = torch.cat([self._samples, self._samples.new_zeros(zeros)])
        total = 1 + (padded + 2 * self._pad - self.n_fft) // self.hop
        self._add_features(max(total, 0))
        out = self._cnn_frames(-(-self._frames // self.stride), end=True)
        real = 1 + (self.received + 2 * self._pad - self.n_fft) // self.hop  # feature frames
        if padded > self.received:  # the offline transcriber's count for a padded clip
            ratio = torch.tensor(real, dtype=torch.float32) / self._frames
            outputs = int(torch.round(ratio * self._outputs))
        else:
            outputs = -(-real // self.stride)
        return out[:, : max(0, outputs - (self._outputs - out.shape[1]))]

    def _add_features(self, ready: int) -> None:
        """Compute feature frames up to ``ready`` (exclusive) and drop the samples before the
        next frame's window."""
        if ready > self._frames:
            start = self._frames * self.hop - self._sample_base
            stop = (ready - 1) * self.hop + self.n_fft - self._sample_base
            piece = self._samples[start:stop].unsqueeze(0)
            feats = self._fbanks(spectral_magnitude(self._stft(piece)))  # (1, n, n_mels)
            feats = self._normalize(feats, torch.ones(1, device=feats.device))
            self._feats = torch.cat([self._feats, feats], dim=1)
            self._frames = ready
        keep = self._frames * self.hop - self._sample_base
        if keep > 0:
            self._samples = self._samples[keep:]
            self._sample_base += keep

    def _cnn_frames(self, ready_out: int, end: bool = False) -> Tensor:
        """CNN outputs ``_outputs .. ready_out`` (1, L, F', C); at the end the slice runs to the
        last feature frame, whose 'same' padding is the whole input's."""
        first, last = self._outputs, ready_out
        if last <= first:
            return self._empty()
        lo = max(0, first - self._margin)  # the slice starts at lo * stride
        stop = self._frames if end else min(self._frames, (last - 1) * self.stride + self.reach + 1)
        piece = self._feats[:, lo * self.stride - self._feat_base: stop - self._feat_base]
        out = self._cnn(piece)[:, first - lo: last - lo]
        self._outputs = last
        drop = max(0, (last - self._margin) * self.stride - self._feat_base)
        self._feats = self._feats[:, drop:]
        self._feat_base += drop
        return out

    def _empty(self) -> Tensor:
        """No frames: (1, 0, 0, 0), which the stream skips."""
        return self._feats.new_zeros(1, 0, 0, 0)
