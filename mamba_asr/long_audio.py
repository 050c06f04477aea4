"""Features and CNN front-end of a whole recording computed chunk by chunk: the tensor that one
call gives, with a peak memory set by the chunk size instead of the recording's length.

The encoder after the front-end costs linear time and memory, so a long file goes through it in
one pass; what would not fit is SpeechBrain's ``Fbank`` and ``ConvolutionFrontEnd`` on the whole
file at once (~95 MB per minute at ConMamba-S sizes). Both are local in time except for the
Fbank's dB floor (``top_db`` below the recording's loudest bin), which is applied once all the
chunks are in.
"""

from __future__ import annotations

import copy
import gc
import math
import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import spectral_magnitude

# 30 s of 10 ms frames: ~50 MB of front-end activations at ConMamba-S sizes (80 mels, (64, 32)).
DEFAULT_CHUNK_FRAMES = 3000

Setup = TypeVar("Setup")


def frontend(
    compute_features: Fbank,
    normalize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cnn: torch.nn.Module,
    wav: torch.Tensor,
    chunk_frames: int = DEFAULT_CHUNK_FRAMES,
) -> torch.Tensor:
    """``cnn(normalize(compute_features(wav), torch.ones(1)))`` computed in chunks of
    ``chunk_frames`` feature frames (10 ms each); the same values up to float rounding.

    ``wav`` (batch, samples), each row a whole recording (no padding); ``normalize`` runs once on
    the whole feature matrix (a ``WindowedInputNormalization`` does so in small memory);
    ``cnn`` a SpeechBrain ``ConvolutionFrontEnd`` (or any stack of 'same'-padded convolutions
    with ``get_filter_properties``) in eval mode. Returns what ``cnn`` returns,
    (batch, T', F', C) for a ``ConvolutionFrontEnd``, T' = ceil(T / its total stride).
    """
    _check_positive("chunk_frames", chunk_frames)
    if wav.dim() != 2:
        raise ValueError(
            f"frontend: wav must be (batch, samples), got shape {tuple(wav.shape)}"
        )
    with torch.no_grad():
        feats = chunked_fbank(compute_features, wav, chunk_frames)  # (batch, T, n_mels)
        feats = normalize(feats, torch.ones(wav.shape[0], device=wav.device))
        return chunked_cnn(cnn, feats, chunk_frames)


@torch.no_grad()
def chunked_fbank(compute_features: Fbank, wav: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """``compute_features(wav)`` (batch, T, n_mels) of ``wav`` (batch, samples), computed
    ``chunk_frames`` frames at a time.

    Each chunk of audio starts on a frame boundary (a multiple of the hop) and carries an FFT
    length of extra samples on both sides, so its STFT frames are those of the whole signal;
    the frames next to a cut, which see the chunk's padding, are dropped. Like ``Fbank``, it
    runs in float32 without autocast when autocast is on.
    """
    if not isinstance(compute_features, Fbank):
        raise TypeError(
            f"chunked_fbank: compute_features must be speechbrain.lobes.features.Fbank, "
            f"got {type(compute_features).__name__}"
        )
    if compute_features.deltas or compute_features.context:
        raise ValueError(
            "chunked_fbank: Fbank with deltas or context is not supported (the configurations "
            "use neither)"
        )
    _check_positive("chunk_frames", chunk_frames)
    stft = compute_features.compute_STFT
    hop, n_fft = stft.hop_length, stft.n_fft
    pad = n_fft // 2 if stft.center else 0
    n_frames = 1 + (wav.shape[1] + 2 * pad - n_fft) // hop  # torch.stft's frame count
    if n_frames <= chunk_frames:
        return compute_features(wav)
    if torch.is_autocast_enabled(wav.device.type):  # as Fbank.forward does
        wav = wav.float()
    with torch.autocast(wav.device.type, enabled=False):
        return _fbank_chunks(compute_features, wav, n_frames, chunk_frames)


def _fbank_chunks(
    compute_features: Fbank, wav: torch.Tensor, n_frames: int, chunk_frames: int
) -> torch.Tensor:
    """The body of ``chunked_fbank`` for ``n_frames`` > ``chunk_frames``."""
    stft = compute_features.compute_STFT
    hop, n_fft = stft.hop_length, stft.n_fft
    # The filterbank of the chunks leaves out the dB floor, which depends on the whole file.
    fbanks = copy.copy(compute_features.compute_fbanks)
    fbanks.top_db = math.inf
    margin = math.ceil(n_fft / hop)  # frames whose window may reach past a cut
    out = None
    for first in range(0, n_frames, chunk_frames):
        last = min(first + chunk_frames, n_frames)
        lo = max(first - margin, 0)
        end = wav.shape[1] if last == n_frames else (last + margin) * hop + n_fft
        feats = fbanks(spectral_magnitude(stft(wav[:, lo * hop:end])))
        if out is None:
            out = feats.new_empty(wav.shape[0], n_frames, feats.shape[2])
        out[:, first:last] = feats[:, first - lo:last - lo]
    if fbanks.log_mel:  # the floor of Filterbank._amplitude_to_DB, per recording
        top_db = compute_features.compute_fbanks.top_db
        floor = out.amax(dim=(-2, -1)) - top_db
        torch.maximum(out, floor.view(out.shape[0], 1, 1), out=out)
    return out


@torch.no_grad()
def chunked_cnn(cnn: torch.nn.Module, feats: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """``cnn(feats)`` of ``feats`` (batch, T, ...), computed about ``chunk_frames`` input frames
    at a time.

    Each chunk starts on a multiple of the front-end's total stride, so its output frames are
    those of the whole input, and carries the receptive field's worth of extra output frames on
    both sides, which are dropped.
    """
    _check_positive("chunk_frames", chunk_frames)
    if cnn.training:
        raise ValueError(
            f"chunked_cnn: {type(cnn).__name__} is in training mode (dropout differs per "
            "chunk); call .eval() first"
        )
    stride, window = _stride_and_window(cnn)
    n_in = feats.shape[1]
    n_out = -(-n_in // stride)
    step = max(1, chunk_frames // stride)  # output frames per chunk
    if n_out <= step:
        return cnn(feats)
    margin = -(-window // stride) + 1  # output frames that may see a cut
    out = None
    for first in range(0, n_out, step):
        last = min(first + step, n_out)
        lo, hi = max(first - margin, 0), min(last + margin, n_out)
        piece = feats[:, lo * stride:min(hi * stride, n_in)]
        y = cnn(piece)
        if y.shape[1] != -(-piece.shape[1] // stride):
            raise ValueError(
                f"chunked_cnn: {type(cnn).__name__} gave {y.shape[1]} frames for "
                f"{piece.shape[1]}, not ceil(frames / stride {stride}): it is not a stack of "
                "'same'-padded convolutions"
            )
        if out is None:
            out = y.new_empty(y.shape[0], n_out, *y.shape[2:])
        out[:, first:last] = y[:, first - lo:last - lo]
    return out


def _stride_and_window(cnn: torch.nn.Module) -> tuple[int, int]:
    """Total stride and receptive field (input frames) of ``cnn``, from SpeechBrain's filter
    analysis; only 'same'-padded, non-causal stacks keep their frames aligned with the input's."""
    if not hasattr(cnn, "get_filter_properties"):
        raise TypeError(
            f"chunked_cnn: {type(cnn).__name__} has no get_filter_properties(); expected a "
            "SpeechBrain ConvolutionFrontEnd"
        )
    for name, module in cnn.named_modules():
        padding = getattr(module, "padding", "same")
        if isinstance(padding, str) and padding != "same":
            raise ValueError(
                f"chunked_cnn: {name} of {type(cnn).__name__} has padding {padding!r}; "
                "expected 'same'"
            )
    properties = cnn.get_filter_properties()
    if properties.causal:
        raise ValueError(f"chunked_cnn: {type(cnn).__name__} is causal; expected 'same' padding")
    return properties.stride, properties.get_effective_size()


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive number of frames, got {value!r}")


# --------------------------------------------------------------------------- peak memory


def peak_memory(call: Callable[[Setup], Any], setup: Callable[[], Setup]) -> int:
    """Bytes by which ``call(setup())`` raises the resident memory of a fresh process above
    what it held after ``setup()``: the peak memory of the call, inputs excluded.

    Runs in a spawned process (``call`` and ``setup`` must be picklable: module-level functions
    or ``functools.partial`` of them), so the caller's allocator caches do not hide anything.
    On Linux the high-water mark is reset after ``setup`` (``/proc/self/clear_refs``);
    elsewhere it is ``ru_maxrss``, which a larger ``setup`` peak can hide.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (call, setup))


def _measure(call: Callable[[Setup], Any], setup: Callable[[], Setup]) -> int:
    inputs = setup()
    gc.collect()
    before = _resident()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    except OSError:
        before = max(before, _peak_resident())
    call(inputs)
    return max(0, _peak_resident() - before)


def _resident() -> int:
    """Current resident memory of this process, bytes."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return _peak_resident()


def _peak_resident() -> int:
    """High-water mark of this process's resident memory, bytes."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
