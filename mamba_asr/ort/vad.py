"""Voice-activity segmentation through the ONNX file of the ``silero-vad`` wheel, with
onnxruntime and NumPy: the segments of :func:`mamba_asr.vad.speech_segments` without torch.

The wheel's Python package imports torch, so the file is found without importing it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime

from mamba_asr import vad_segments
from mamba_asr.ort.audio import resample

STATE_SHAPE = (2, 1, 128)  # the model's recurrent state for one stream


def model_path() -> Path:
    """``silero_vad/data/silero_vad.onnx`` of the installed wheel (its package not imported);
    FileNotFoundError naming what is missing."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the silero-vad package is not installed (pip install silero-vad)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the silero-vad wheel's ONNX model is missing")
    return path


@functools.cache
def vad_session() -> onnxruntime.InferenceSession:
    """The VAD model on the CPU, loaded once; one thread (32 ms frames run one by one)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(model_path()), sess_options=options,
                                        providers=["CPUExecutionProvider"])


def speech_probabilities(audio: np.ndarray, rate: int) -> np.ndarray:
    """The speech probability (frames,) of each frame of ``audio`` (samples,) at ``rate``
    (8 or 16 kHz), padded with zeros to whole frames; each frame sees the previous frame's
    last samples, as the wheel's own wrapper runs it."""
    _, window = vad_segments.vad_rate(rate)
    context = window // 8  # 64 samples at 16 kHz, 32 at 8 kHz
    frames = -(-len(audio) // window)
    padded = np.zeros(context + frames * window, dtype=np.float32)
    padded[context:context + len(audio)] = audio
    session = vad_session()
    state = np.zeros(STATE_SHAPE, dtype=np.float32)
    sr = np.array(rate, dtype=np.int64)
    probs = np.empty(frames, dtype=np.float32)
    for i in range(frames):
        chunk = padded[i * window:(i + 1) * window + context][None]
        out, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
        probs[i] = out[0, 0]
    return probs


def speech_segments(
    wav: np.ndarray,
    sample_rate: int,
    max_seconds: float,
    *,
    threshold: float = 0.5,
    min_silence_ms: int = vad_segments.MIN_SILENCE_MS,
    pad_ms: int = vad_segments.PAD_MS,
) -> list[tuple[int, int]]:
    """The speech of ``wav`` (samples,) as sample ranges ``(start, end)`` of the file, in order,
    each at most ``max_seconds`` long: :func:`mamba_asr.vad.speech_segments` for NumPy."""
    if not isinstance(wav, np.ndarray) or wav.ndim != 1 or wav.dtype.kind != "f":
        shape = wav.shape if isinstance(wav, np.ndarray) else type(wav).__name__
        raise ValueError(f"speech_segments: wav must be a float array (samples,), got {shape}")
    vad_segments.check_options(sample_rate, max_seconds)
    rate, window = vad_segments.vad_rate(sample_rate)
    audio = resample(wav.astype(np.float32, copy=False), sample_rate, rate)
    if len(audio) < window:  # Silero refuses less than a frame
        audio = np.pad(audio, (0, window - len(audio)))
    probs = speech_probabilities(audio, rate)
    regions = vad_segments.speech_regions(probs, rate, len(audio), threshold, min_silence_ms,
                                          pad_ms)
    return vad_segments.segments(regions, vad_segments.pause_scores(probs), len(wav),
                                 sample_rate, max_seconds, threshold)
