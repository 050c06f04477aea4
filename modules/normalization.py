"""Feature normalisation whose statistics do not depend on how long the input is."""

from __future__ import annotations

import torch
from speechbrain.processing.features import InputNormalization, make_padding_mask

# 60 s of 10 ms frames: longer than any LibriSpeech utterance (35 s at most), so every
# utterance the recipes train and test on is normalised exactly as by norm_type "sentence".
DEFAULT_WINDOW_FRAMES = 6000


class WindowedInputNormalization(InputNormalization):
    """SpeechBrain's ``InputNormalization`` whose per-utterance statistics cover at most
    ``window_frames`` frames, so that an hour-long recording is normalised like its parts.

    ``norm_type="sentence"``: an input row of at most ``window_frames`` valid frames goes through
    ``InputNormalization`` itself (the same output, bit for bit, padding included). Each frame of
    a longer row is normalised with the mean and standard deviation of the ``window_frames``
    valid frames centred on it, the window shifted to stay inside the valid frames (padding
    frames use the last window, or are left as they are with ``avoid_padding_norm``). The
    window statistics come from float64 cumulative sums taken block by block: O(T) time and,
    besides the output, O(window_frames) memory.

    ``norm_type="global"`` is ``InputNormalization`` as is (its running statistics never
    depended on the input's length); ``"batch"`` is refused, its statistics span the input.
    Checkpoints and state are those of ``InputNormalization``: a recipe's ``normalizer``
    checkpoint loads into this class.

    Arguments
    ---------
    window_frames : int
        The most frames one set of statistics covers (6000: 60 s of 10 ms frames).
    The others are ``InputNormalization``'s, except that ``norm_type`` is "sentence" (windowed,
    the default) or "global", and ``length_dim`` must be 1.
    """

    def __init__(
        self,
        mean_norm: bool = True,
        std_norm: bool = True,
        norm_type: str = "sentence",
        avg_factor: float | None = None,
        length_dim: int = 1,
        update_until_epoch: int | None = 2,
        avoid_padding_norm: bool = False,
        epsilon: float = 1e-10,
        device: str | torch.device = "cpu",
        window_frames: int = DEFAULT_WINDOW_FRAMES,
    ) -> None:
        if norm_type == "batch":
            raise ValueError(
                "WindowedInputNormalization: norm_type 'batch' computes its statistics over the "
                "whole input; expected 'sentence' (windowed) or 'global'"
            )
        super().__init__(
            mean_norm, std_norm, norm_type, avg_factor, length_dim, update_until_epoch,
            avoid_padding_norm, epsilon, device,
        )
        if isinstance(window_frames, bool) or not isinstance(window_frames, int) \
                or window_frames < 1:
            raise ValueError(
                f"WindowedInputNormalization: window_frames must be a positive number of "
                f"frames, got {window_frames!r}"
            )
        if self.length_dim != 1:
            raise ValueError(
                f"WindowedInputNormalization: length_dim must be 1 (batch, time, ...), "
                f"got {self.length_dim}"
            )
        self.window_frames = window_frames

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, epoch: int | None = None
    ) -> torch.Tensor:
        """Normalise ``x`` (batch, time, ...) whose rows have relative ``lengths`` (batch,)."""
        if self.norm_type != "sentence":
            return super().forward(x, lengths, epoch)
        mask = make_padding_mask(x, lengths, length_dim=1)
        valid = mask.reshape(x.shape[0], x.shape[1]).sum(1)  # (batch,) valid frames per row
        long_rows = (valid > self.window_frames).nonzero().flatten().tolist()
        if not long_rows:
            return super().forward(x, lengths, epoch)
        # Short rows keep the base class's output (computed on the same batch); long rows are
        # overwritten. A batch of long rows only skips the base computation.
        short_rows = len(long_rows) < x.shape[0]
        out = super().forward(x, lengths, epoch) if short_rows else torch.empty_like(x)
        for row in long_rows:
            self._windowed(x[row], int(valid[row]), out[row])
        return out

    def _windowed(self, x: torch.Tensor, n_valid: int, out: torch.Tensor) -> None:
        """Writes into ``out`` ``x`` (time, ...), which has ``n_valid`` > window_frames valid
        frames, each frame normalised with the statistics of its window."""
        if x.device.type == "mps":  # no float64 there: the statistics are computed on the CPU
            on_cpu = torch.empty(x.shape, dtype=out.dtype)
            self._windowed(x.cpu(), n_valid, on_cpu)
            out.copy_(on_cpu)
            return
        width = self.window_frames
        block = max(2 * width, 4096)  # output frames per block: the window overlap costs 1/2
        frames = x.reshape(x.shape[0], -1)  # (time, features)
        out = out.view(frames.shape)
        for first in range(0, frames.shape[0], block):
            last = min(first + block, frames.shape[0])
            t = torch.arange(first, last, device=x.device)
            starts = (t - width // 2).clamp(0, n_valid - width)  # each frame's window start
            lo, hi = int(starts[0]), int(starts[-1]) + width
            # sums[i]: sum of the first i frames of the span, as deviations from its mean
            # (which keeps the float64 differences of sums exact enough).
            shift = frames[lo:hi].mean(0, dtype=torch.float64)
            sums = frames.new_zeros(hi - lo + 1, frames.shape[1], dtype=torch.float64)
            torch.sub(frames[lo:hi], shift, out=sums[1:])
            sums[1:].cumsum_(0)
            mean = _window_means(sums, starts - lo, width)
            if self.std_norm:
                torch.sub(frames[lo:hi], shift, out=sums[1:])
                sums[1:].square_().cumsum_(0)
                var = _window_means(sums, starts - lo, width).addcmul_(mean, mean, value=-1)
                std = var.clamp_(min=0).sqrt_().to(x.dtype)
                del var
            else:
                std = torch.ones_like(frames[first:last])
            del sums
            mean = mean.add_(shift).to(x.dtype)
            if self.avoid_padding_norm:
                padding = (t >= n_valid).unsqueeze(1)
                mean.masked_fill_(padding, 0.0)
                std.masked_fill_(padding, 1.0)
            torch.sub(frames[first:last], mean, out=out[first:last])
            out[first:last] /= std.clamp_(min=self.epsilon)


def _window_means(sums: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """Means of the ``width`` frames from each of ``starts`` (n,), from the cumulative
    ``sums`` (frames + 1, features); (n, features)."""
    total = sums[starts + width]
    total -= sums[starts]
    return total.div_(width)
