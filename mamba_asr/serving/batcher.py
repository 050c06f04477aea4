"""Batching across requests: transcriptions queued by concurrent requests run together in one
forward pass, on a worker thread (the event loop keeps answering ``/health`` meanwhile).

The worker takes the oldest waiting job, then keeps adding jobs until the batch holds
``max_batch_seconds`` of audio or the oldest job has waited ``max_wait_ms``; jobs that queued
while a batch was running go into the next one at once. With ``batching=False`` every job runs
alone. The queue holds at most ``max_queue`` jobs (:class:`QueueFull` beyond).

Usage (in a coroutine):
    batcher = Batcher(run_batch, max_batch_seconds=60, max_wait_ms=20)
    batcher.start()
    job = batcher.submit(waveform, sample_rate)
    result = await job.future                          # run_batch's result for this job
    batcher.stop()
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class QueueFull(RuntimeError):
    """The service's queue is full: the client should retry later."""


@dataclass(eq=False)
class Job:
    """One transcription waiting for (or in) a forward pass."""

    wav: torch.Tensor  # (samples,) mono
    rate: int  # its sample rate
    seconds: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # its request gave up (timeout, disconnect): skipped if not started


# run_batch(jobs) -> one result per job (or an exception per job); it runs on the worker thread.
RunBatch = Callable[[list[Job]], list[Any]]


class Batcher:
    """Groups queued jobs into forward passes on one worker thread (module docstring)."""

    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_seconds: float = 60.0,
        max_wait_ms: float = 20.0,
        batching: bool = True,
        max_queue: int = 64,
        on_queue_change: Callable[[int], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.run_batch = run_batch
        self.max_batch_seconds = max_batch_seconds
        self.max_wait = max_wait_ms / 1000.0
        self.batching = batching
        self.max_queue = max_queue
        self._on_queue_change = on_queue_change or (lambda depth: None)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="mamba-asr-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batch running, end the worker thread; jobs still queued get QueueFull."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            while self._queue:
                job = self._queue.popleft()
                _resolve(job, QueueFull("the service is shutting down"))
            self._on_queue_change(0)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, wav: torch.Tensor, rate: int) -> Job:
        """Queue a job from a coroutine; ``await job.future`` gives its result. QueueFull when
        ``max_queue`` jobs are already waiting."""
        loop = asyncio.get_running_loop()
        job = Job(wav, rate, len(wav) / rate, loop, loop.create_future())
        with self._cond:
            if self._stopping:
                raise QueueFull("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} transcriptions are already waiting")
            self._queue.append(job)
            self._on_queue_change(len(self._queue))
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Its request gave up (timeout, disconnect): drop the job from the queue, or, when its
        pass already started, let its result go unread."""
        with self._cond:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self._on_queue_change(len(self._queue))

    # ------------------------------------------------------------------ worker thread

    def _next_batch(self) -> list[Job] | None:
        """The next jobs to run together (None: stop)."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            seconds = batch[0].seconds
            deadline = batch[0].queued_at + self.max_wait
            while self.batching and seconds < self.max_batch_seconds:
                if not self._queue:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stopping:
                        break
                    self._cond.wait(left)
                    continue
                job = self._queue[0]
                if job.cancelled:
                    self._queue.popleft()
                    continue
                if seconds + job.seconds > self.max_batch_seconds:
                    break
                batch.append(self._queue.popleft())
                seconds += job.seconds
            self._on_queue_change(len(self._queue))
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if not job.cancelled]
            if not batch:
                continue
            try:
                results = self.run_batch(batch)
            except Exception as exc:  # the whole pass failed: every job gets the error
                results = [exc] * len(batch)
            for job, result in zip(batch, results, strict=True):
                _resolve(job, result)


def _resolve(job: Job, result: Any) -> None:
    """Hand ``result`` (or an exception) to the job's coroutine, from any thread."""

    def settle() -> None:
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: nobody waits for it any more
        pass
