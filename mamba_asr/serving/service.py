"""The transcription service's state, apart from HTTP: its settings, the model (loaded after
the server starts listening, switched on reload), the batcher, readiness and draining.

Lifecycle: :meth:`Service.start` (in the app's lifespan) creates the private upload folder and
starts loading the model in a thread; ``ready`` turns true once it is loaded and warmed up.
:meth:`Service.drain` (SIGTERM) marks the service not ready and waits for the requests in
flight (HTTP requests and ``/v1/stream`` streams); :meth:`Service.stop` ends the worker and
removes the upload folder. Streams run their model calls in one worker thread of their own
(:meth:`Service.in_stream_thread`), beside the batcher's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mamba_asr.serving import models
from mamba_asr.serving.batcher import Batcher, Job
from mamba_asr.serving.metrics import ServiceMetrics
from mamba_asr.transcript import Transcript

logger = logging.getLogger(__name__)

MB = 1 << 20
T = TypeVar("T")


@dataclass
class Settings:
    """Everything ``serve.py`` configures (see its --help)."""

    model: str
    models: Path = Path("models/registry")
    device: str = "cpu"
    api_key: str | None = None
    max_batch_seconds: float = 60.0
    max_wait_ms: float = 20.0
    batching: bool = True
    max_queue: int = 64
    max_upload_mb: float = 25.0
    max_audio_seconds: float = 3600.0
    request_timeout: float = 120.0
    drain_seconds: float = 30.0
    max_streams: int = 4
    stream_idle_timeout: float = 30.0

    def __post_init__(self) -> None:
        positive = ("max_batch_seconds", "max_upload_mb", "max_audio_seconds",
                    "request_timeout", "stream_idle_timeout")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"--{key} must be positive, got {getattr(self, key)}")
        for key in ("max_wait_ms", "drain_seconds"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key} must be 0 or more, got {getattr(self, key)}")
        if self.max_queue < 1:
            raise ValueError(f"--max_queue must be at least 1, got {self.max_queue}")
        if self.max_streams < 1:
            raise ValueError(f"--max_streams must be at least 1, got {self.max_streams}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api_key is empty: give a key, or leave it out for no auth")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)


@dataclass
class Result:
    """A transcription and the model that made it."""

    transcript: Transcript
    model: models.ServedModel
    forward_seconds: float  # this request's share of its forward pass


class Service:
    """The service's state (module docstring)."""

    def __init__(self, settings: Settings, where: models.ModelLocation | None = None) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.where = where or models.locate(settings.model, settings.models)
        self.model: models.ServedModel | None = None
        self.state = "starting"  # starting, loading, ready, failed, draining, stopped
        self.error: str | None = None
        self.in_flight = 0  # HTTP requests and streams being answered (draining waits)
        self.streams = 0  # WebSocket streams open (at most settings.max_streams)
        # every stream's model calls, one at a time, off the event loop (the batcher has its
        # own worker thread: both read the shared model under no_grad); made by start()
        self._stream_executor: ThreadPoolExecutor | None = None
        self.upload_dir: Path | None = None
        self._previous_tempdir: str | None = None
        self._reload_lock = asyncio.Lock()
        self._load_task: asyncio.Task | None = None
        self.batcher = Batcher(
            self._run_batch, settings.max_batch_seconds, settings.max_wait_ms,
            settings.batching, settings.max_queue, self.metrics.queue_depth.set,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        """Create the private upload folder and start loading the model (returns at once)."""
        # Starlette spools uploads over 1 MB to the temporary folder: make it ours, 0700.
        self.upload_dir = Path(tempfile.mkdtemp(prefix="mamba-asr-uploads-"))
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.upload_dir)
        self.batcher.start()
        self._stream_executor = ThreadPoolExecutor(1, thread_name_prefix="mamba-asr-stream")
        self.state = "loading"
        self._load_task = asyncio.create_task(self._load_first())

    async def _load_first(self) -> None:
        try:
            model = await asyncio.to_thread(self._load, self.where)
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.error("loading %s failed: %s", self.where.ref, self.error)
            return
        self._serve(model)
        if self.state == "loading":
            self.state = "ready"
            logger.info("ready: %s (%s)", model.ref, model.where.path)

    def _load(self, where: models.ModelLocation) -> models.ServedModel:
        s = self.settings
        return models.load(where, device=s.device, max_batch_seconds=s.max_batch_seconds)

    def _serve(self, model: models.ServedModel) -> None:
        self.model = model
        self.where = model.where
        card = model.card
        self.metrics.set_model(model.name, model.version, card.get("family", ""),
                               card.get("architecture", ""))

    async def drain(self, seconds: float | None = None) -> None:
        """Not ready from now on; wait until no request is in flight, at most ``seconds``."""
        self.state = "draining"
        deadline = time.monotonic() + (self.settings.drain_seconds if seconds is None
                                       else seconds)
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning("drain: %d request(s) still in flight after %.0f s",
                           self.in_flight, self.settings.drain_seconds)

    async def stop(self) -> None:
        """End the worker (failing queued jobs) and remove the upload folder."""
        self.state = "stopped"
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await asyncio.to_thread(self.batcher.stop, 30.0)
        if self._stream_executor is not None:
            self._stream_executor.shutdown(wait=False, cancel_futures=True)
        if self.upload_dir is not None:
            if tempfile.tempdir == str(self.upload_dir):
                tempfile.tempdir = self._previous_tempdir
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    # ------------------------------------------------------------------ reload

    async def reload(self) -> dict[str, Any]:
        """Resolve ``--model`` again; when it names another version, load that one beside
        the one serving and switch (requests in flight finish on the old one)."""
        async with self._reload_lock:
            previous = self.model.ref if self.model else None
            try:
                where = models.locate(self.settings.model, self.settings.models)
                if self.model is not None and where.ref == self.model.ref:
                    self.metrics.reloads.labels("unchanged").inc()
                    return {"changed": False, "model": previous, "previous": previous}
                model = await asyncio.to_thread(self._load, where)
            except Exception:
                self.metrics.reloads.labels("failed").inc()
                raise
            self._serve(model)
            if self.state in ("loading", "failed"):
                self.state, self.error = "ready", None
            self.metrics.reloads.labels("switched").inc()
            logger.info("reloaded: %s -> %s", previous, model.ref)
            return {"changed": True, "model": model.ref, "previous": previous}

    # ------------------------------------------------------------------ transcription

    async def transcribe(self, wav: Any, rate: int) -> Result:
        """Queue one mono waveform sampled at ``rate`` and wait for its transcript.
        QueueFull when the queue is full, TimeoutError past ``request_timeout``."""
        job = self.batcher.submit(wav, rate)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future),
                                          self.settings.request_timeout)
        finally:
            if not job.future.done():  # timed out or the client went away
                self.batcher.cancel(job)
                job.future.cancel()

    async def in_stream_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the streams' worker thread (model compute of ``/v1/stream``: a
        stream's ``feed`` and ``finish``), awaited without blocking the event loop."""
        if self._stream_executor is None:
            raise RuntimeError("the service is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._stream_executor, functools.partial(fn, *args))

    def _run_batch(self, jobs: list[Job]) -> list[Result]:
        """One forward pass over ``jobs`` on the current model (worker thread)."""
        model = self.model
        if model is None:
            raise RuntimeError("no model loaded")
        start = time.perf_counter()
        transcripts = list(model.transcriber.transcribe([(job.wav, job.rate) for job in jobs]))
        spent = time.perf_counter() - start
        audio = sum(job.seconds for job in jobs)
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.batch_audio.observe(audio)
        results = []
        for job, t in zip(jobs, transcripts, strict=True):
            share = spent * job.seconds / audio if audio else 0.0
            self.metrics.audio_seconds.inc(job.seconds)
            if job.seconds:
                self.metrics.real_time_factor.observe(share / job.seconds)
            results.append(Result(t, model, share))
        return results


@contextlib.contextmanager
def private_file(folder: Path, suffix: str) -> Iterator[Path]:
    """A new empty file in ``folder`` (0600), removed on exit whatever happens."""
    fd, name = tempfile.mkstemp(dir=folder, suffix=suffix)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
