"""Voice-activity segmentation with Silero VAD: where the speech of a recording is, in pieces of
at most a given length.

The model ships in the ``silero-vad`` wheel and runs on the CPU, offline.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torchaudio

from mamba_asr import vad_segments
from mamba_asr.vad_segments import MIN_SILENCE_MS, PAD_MS, PAUSE_FRAMES, VAD_RATES  # noqa: F401


@functools.cache
def vad_model() -> torch.nn.Module:
    """Silero VAD's TorchScript model, loaded once, on the CPU. Importing ``silero_vad`` sets
    torch's thread count to 1; the count the process had is put back."""
    threads = torch.get_num_threads()
    try:
        import silero_vad
    finally:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():  # its resource lookup and torch.jit.load are deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return silero_vad.load_silero_vad()


def speech_segments(
    wav: torch.Tensor,
    sample_rate: int,
    max_seconds: float,
    *,
    threshold: float = 0.5,
    min_silence_ms: int = MIN_SILENCE_MS,
    pad_ms: int = PAD_MS,
) -> list[tuple[int, int]]:
    """The speech of ``wav`` (samples,) as sample ranges ``(start, end)`` of the file, in order,
    each at most ``max_seconds`` long, with ``pad_ms`` of padding around the speech.

    Silero VAD gives each 32 ms frame a speech probability; frames above ``threshold`` are
    speech and a pause of ``min_silence_ms`` ends a region (Silero's own rules). A region longer
    than ``max_seconds`` is cut where the probability, averaged over ``PAUSE_FRAMES`` frames, is
    lowest (its quietest, longest pause) among the cuts that leave pieces of at most
    ``max_seconds``; where that is still speech (no pause at all) it is cut at ``max_seconds``.
    """
    if not isinstance(wav, torch.Tensor) or wav.dim() != 1 or not wav.is_floating_point():
        shape = tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
        raise ValueError(f"speech_segments: wav must be a float tensor (samples,), got {shape}")
    vad_segments.check_options(sample_rate, max_seconds)
    model = vad_model()
    from silero_vad import get_speech_timestamps_from_probs  # imported by vad_model()

    vad_rate, window = vad_segments.vad_rate(sample_rate)
    audio = wav.detach().float().cpu()
    if vad_rate != sample_rate:
        audio = torchaudio.functional.resample(audio, sample_rate, vad_rate)
    if len(audio) < window:  # Silero refuses less than a frame
        audio = torch.nn.functional.pad(audio, (0, window - len(audio)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 32 ms frames one by one: more threads only add overhead
    try:
        probs = model.audio_forward(audio.unsqueeze(0), vad_rate)[0]  # (frames,)
    finally:
        torch.set_num_threads(threads)
    regions = get_speech_timestamps_from_probs(
        probs.tolist(), sampling_rate=vad_rate, threshold=threshold,
        min_silence_duration_ms=min_silence_ms, speech_pad_ms=pad_ms,
        audio_length_samples=len(audio),
    )
    pause = vad_segments.pause_scores(probs.numpy())
    return vad_segments.segments(regions, pause, len(wav), sample_rate, max_seconds, threshold)
