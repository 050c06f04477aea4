"""Streaming transcription: a causal model's front-end, encoder and CTC decoding run chunk by
chunk as the audio arrives (:class:`Stream`, from ``Transcriber.stream()``)."""

from mamba_asr.streaming.stream import (
    Stream,
    StreamUpdate,
    make_encoder_streamer,
    pcm16_to_float,
    stream_problem,
)

__all__ = ["Stream", "StreamUpdate", "make_encoder_streamer", "pcm16_to_float", "stream_problem"]
