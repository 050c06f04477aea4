"""Voice-activity segmentation with Silero VAD: where the speech of a recording is, in pieces of
at most a given length.

The model ships in the ``silero-vad`` wheel and runs on the CPU, offline.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torchaudio

VAD_RATES = (8000, 16000)  # the rates Silero VAD runs at; others are resampled to 16 kHz
PAD_MS = 200  # speech padding kept on both sides of a segment (less where two segments meet)
MIN_SILENCE_MS = 300  # a pause this long ends a segment; shorter ones stay inside it
PAUSE_FRAMES = 5  # over-long segments are cut where the probability averaged over 160 ms is lowest


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
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(
            f"speech_segments: sample_rate must be a positive int, got {sample_rate!r}"
        )
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) \
            or not 0 < max_seconds < math.inf:
        raise ValueError(
            f"speech_segments: max_seconds must be a positive number of seconds, "
            f"got {max_seconds!r}"
        )
    model = vad_model()
    from silero_vad import get_speech_timestamps_from_probs  # imported by vad_model()

    vad_rate = sample_rate if sample_rate in VAD_RATES else 16000
    window = 512 if vad_rate == 16000 else 256  # samples per VAD frame
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
    # Each frame's pause score: the speech probability averaged over the frames around it.
    pause = torch.nn.functional.avg_pool1d(
        probs.view(1, 1, -1), PAUSE_FRAMES, stride=1, padding=PAUSE_FRAMES // 2,
        count_include_pad=False,
    )[0, 0]
    hop = window * sample_rate / vad_rate  # file samples per VAD frame
    longest = max(1, int(max_seconds * sample_rate))
    segments = []
    for region in regions:
        start = min(round(region["start"] * sample_rate / vad_rate), len(wav))
        end = min(round(region["end"] * sample_rate / vad_rate), len(wav))
        if end > start:
            segments += _split(start, end, longest, pause, hop, threshold)
    return segments


def _split(
    start: int, end: int, longest: int, pause: torch.Tensor, hop: float, threshold: float
) -> list[tuple[int, int]]:
    """``[start, end)`` in pieces of at most ``longest`` samples, each cut at the frame of lowest
    ``pause`` score (frames of ``hop`` samples) that leaves the rest splittable, or at
    ``longest`` where no frame there scores below ``threshold``."""
    pieces = []
    while end - start > longest:
        needed = -(-(end - start) // longest)  # pieces still to make, at least
        lo = max(start + 1, end - (needed - 1) * longest)  # the rest fits in needed - 1
        hi = start + longest
        first = math.ceil(lo / hop - 0.5)
        last = min(math.floor(hi / hop - 0.5), len(pause) - 1)
        cut = hi
        if first <= last:
            frame = first + int(torch.argmin(pause[first:last + 1]))
            if pause[frame] < threshold:
                cut = min(max(round((frame + 0.5) * hop), lo), hi)
        pieces.append((start, cut))
        start = cut
    return [*pieces, (start, end)]
