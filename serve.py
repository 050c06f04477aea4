#!/usr/bin/env python3
"""Serve a model over HTTP: OpenAI's audio transcription API, live transcription over a
WebSocket (/v1/stream), metrics, health and readiness.

Usage:
    python serve.py --models models/registry --model demo-ctc@production --port 8000
    python serve.py --model models/demo-ctc                     # an export folder, no registry
    curl -F file=@a.flac -F model=demo-ctc http://127.0.0.1:8000/v1/audio/transcriptions

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.audio.transcriptions.create(model="demo-ctc", file=open("a.flac", "rb"))

``--model`` is an export folder (``export.py``) or a registry reference (``name@alias``,
``name@version``, ``name``; ``python -m mamba_asr.registry``). The server listens at once;
``GET /ready`` answers 200 once the model is loaded and warmed up. Concurrent requests are
batched into one forward pass. A streaming model (``hparams/CTC/conmamba_streaming_*.yaml``)
also transcribes live audio on the WebSocket ``/v1/stream`` (16-kHz 16-bit PCM in, JSON
partial and final results out; docs/serving.md). SIGTERM drains (``/ready`` 503, requests
and streams in flight finish, exit 0); SIGHUP (or ``POST /admin/reload``) loads the version
the alias now names and switches without failing requests. Every option also reads
``MAMBA_ASR_<OPTION>`` from the environment (e.g. ``MAMBA_ASR_API_KEY``,
``MAMBA_ASR_MODELS``); the command line wins.
"""

from __future__ import annotations

import mamba_asr  # noqa: F401  (before speechbrain: drops its import-time torchvision notice)

# isort: split
import argparse
import logging
import os
from pathlib import Path

from mamba_asr.config import ConfigError, cli

ENV_PREFIX = "MAMBA_ASR_"
DEFAULTS = {  # option: (type, default, help)
    "model": (str, None, "an export folder or a registry reference name[@alias|@version]"),
    "models": (str, "models/registry", "the registry folder (python -m mamba_asr.registry)"),
    "host": (str, "127.0.0.1", "address to listen on (0.0.0.0: every interface)"),
    "port": (int, 8000, "port to listen on"),
    "api_key": (str, None, "require 'Authorization: Bearer <key>' (not on /health, /ready, "
                "/metrics); prefer the MAMBA_ASR_API_KEY variable to keep it out of ps"),
    "device": (str, "cpu", "cpu, cuda, cuda:1, mps"),
    "max_batch_seconds": (float, 60.0, "audio per forward pass, summed over requests"),
    "max_wait_ms": (float, 20.0, "longest a request waits for others to share its pass"),
    "max_queue": (int, 64, "requests waiting for a pass; beyond: 503 with Retry-After"),
    "max_upload_mb": (float, 25.0, "largest upload (413 beyond, refused while streaming)"),
    "max_audio_seconds": (float, 3600.0, "longest audio (413 beyond; a stream: closed "
                          "with 1008)"),
    "request_timeout": (float, 120.0, "seconds before a transcription answers 504"),
    "drain_seconds": (float, 30.0, "on SIGTERM: longest wait for requests in flight"),
    "max_streams": (int, 4, "WebSocket streams (/v1/stream) open at once; beyond: closed "
                    "with 1013 (try again later)"),
    "stream_idle_timeout": (float, 30.0, "seconds a stream may send nothing before it is "
                            "closed (1008)"),
    "log_level": (str, "info", "debug (with an access log), info, warning, error"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for name, (kind, default, text) in DEFAULTS.items():
        env = ENV_PREFIX + name.upper()
        value = os.environ.get(env, default)
        shown = "(set)" if name == "api_key" and value else value
        p.add_argument(f"--{name}", type=kind, default=value,
                       help=f"{text} [{env}; default: {shown}]")
    p.add_argument("--no_batching", action="store_true",
                   default=os.environ.get(ENV_PREFIX + "NO_BATCHING", "") not in ("", "0"),
                   help="one request per forward pass [MAMBA_ASR_NO_BATCHING]")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.model:
        raise ConfigError("no model: give --model (an export folder or a registry reference "
                          "such as demo-ctc@production) or set MAMBA_ASR_MODEL")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mamba_asr.serving.server import serve
    from mamba_asr.serving.service import Service, Settings

    try:
        settings = Settings(
            model=args.model, models=Path(args.models), device=args.device,
            api_key=args.api_key, max_batch_seconds=args.max_batch_seconds,
            max_wait_ms=args.max_wait_ms, batching=not args.no_batching,
            max_queue=args.max_queue, max_upload_mb=args.max_upload_mb,
            max_audio_seconds=args.max_audio_seconds, request_timeout=args.request_timeout,
            drain_seconds=args.drain_seconds, max_streams=args.max_streams,
            stream_idle_timeout=args.stream_idle_timeout,
        )
        service = Service(settings)  # resolves --model now: a wrong one fails before listening
    except ValueError as exc:  # settings, a registry or card error
        raise ConfigError(str(exc)) from exc
    return serve(service, args.host, args.port, args.log_level)


if __name__ == "__main__":
    cli(main)
