"""The service's Prometheus metrics, in a registry of their own (one per app, so that several
apps in one process, as in the tests, never share counters).

Exposed at ``GET /metrics`` in Prometheus' text format:

- ``mamba_asr_requests_total{route,method,status}`` and
  ``mamba_asr_request_duration_seconds{route}``: every HTTP request, by route template;
- ``mamba_asr_requests_in_flight``: HTTP requests being answered;
- ``mamba_asr_audio_seconds_total``: audio transcribed;
- ``mamba_asr_real_time_factor``: per transcription, seconds in the model / seconds of audio;
- ``mamba_asr_queue_depth`` (requests waiting for a forward pass), ``mamba_asr_batch_size``
  (requests per forward pass) and ``mamba_asr_batch_audio_seconds``;
- ``mamba_asr_streams_active`` (WebSocket streams open on ``/v1/stream``),
  ``mamba_asr_streams_total{end}`` (streams ended: ``final``, ``error``, ``disconnected``),
  ``mamba_asr_stream_audio_seconds_total`` (audio received by streams) and
  ``mamba_asr_stream_errors_total{code}`` (streams ended by an error frame, by its code);
- ``mamba_asr_model_info{name,version,ref,family,architecture}``: the model being served;
  ``mamba_asr_model_reloads_total{result}``;
- ``mamba_asr_peak_resident_memory_bytes`` (the process' peak RSS, any OS) and ``process_*``
  (resident memory, CPU seconds, open files; Linux), ``python_*``.
"""

from __future__ import annotations

import resource
import sys

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RTF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
AUDIO_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class ServiceMetrics:
    """The service's metrics (see the module docstring)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("mamba_asr_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("mamba_asr_request_duration_seconds",
                                 "Seconds from request to response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("mamba_asr_requests_in_flight", "HTTP requests being answered",
                               registry=r)
        self.audio_seconds = Counter("mamba_asr_audio_seconds", "Seconds of audio transcribed",
                                     registry=r)
        self.real_time_factor = Histogram(
            "mamba_asr_real_time_factor",
            "Per transcription: seconds in the model's forward pass / seconds of audio",
            buckets=RTF_BUCKETS, registry=r)
        self.queue_depth = Gauge("mamba_asr_queue_depth",
                                 "Transcriptions waiting for a forward pass", registry=r)
        self.batch_size = Histogram("mamba_asr_batch_size", "Requests per forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_audio = Histogram("mamba_asr_batch_audio_seconds",
                                     "Seconds of audio per forward pass",
                                     buckets=AUDIO_BUCKETS, registry=r)
        self.model = Info("mamba_asr_model", "The model being served", registry=r)
        peak = Gauge("mamba_asr_peak_resident_memory_bytes",
                     "Peak resident memory of the process (getrusage)", registry=r)
        peak.set_function(peak_rss_bytes)
        self.streams_active = Gauge("mamba_asr_streams_active",
                                    "WebSocket streams open (/v1/stream)", registry=r)
        self.streams = Counter("mamba_asr_streams", "WebSocket streams ended, by how",
                               ["end"], registry=r)
        self.stream_audio_seconds = Counter("mamba_asr_stream_audio_seconds",
                                            "Seconds of audio received by streams", registry=r)
        self.stream_errors = Counter("mamba_asr_stream_errors",
                                     "Streams ended by an error frame, by its code", ["code"],
                                     registry=r)
        self.reloads = Counter("mamba_asr_model_reloads", "Model reloads, by result",
                               ["result"], registry=r)

    def set_model(self, name: str, version: str, family: str, architecture: str) -> None:
        self.model.info({"name": name, "version": version, "ref": f"{name}@{version}",
                         "family": family, "architecture": architecture})

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def peak_rss_bytes() -> float:
    """The process' peak resident set size (getrusage: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)
