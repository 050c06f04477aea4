"""Run the service under uvicorn with its own signal handling.

uvicorn on its own closes its socket on SIGTERM, then re-raises the signal (exit 143), and
SIGHUP's default action kills the process. Here instead:

- SIGTERM / SIGINT: the service turns not ready (``/ready`` answers 503, so load balancers
  stop sending), keeps answering what is in flight (and what still arrives) for up to
  ``--drain_seconds``, then the server stops and the process exits 0. A second SIGINT stops
  at once.
- SIGHUP: reload: ``--model`` is resolved again and a moved alias is loaded beside the
  serving model, then switched to (``POST /admin/reload`` does the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn

from mamba_asr.serving.app import create_app
from mamba_asr.serving.service import Service
from mamba_asr.serving.stream_route import MAX_FRAME_BYTES

logger = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 5.0  # after draining: connections still open get this long to finish


class Server(uvicorn.Server):
    """uvicorn's server with the service's SIGTERM (drain), SIGINT and SIGHUP (reload)."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only (an app run by tests in a thread)
            return
        loop = asyncio.get_running_loop()
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_stop, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        try:
            yield
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_stop(self, sig: signal.Signals) -> None:
        if self._stopping:
            if sig == signal.SIGINT:
                logger.warning("second interrupt: stopping now")
                self.force_exit = self.should_exit = True
            return
        self._stopping = True
        logger.info("%s: draining (up to %.0f s), then stopping", sig.name,
                    self.service.settings.drain_seconds)
        self._spawn(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.service.drain()
        finally:
            self.should_exit = True

    def _on_reload(self) -> None:
        logger.info("SIGHUP: reloading %s", self.service.settings.model)
        self._spawn(self._reload())

    async def _reload(self) -> None:
        try:
            result = await self.service.reload()
        except Exception as exc:
            logger.error("reload failed, still serving %s: %s", self.service.where.ref, exc)
            return
        logger.info("reload: %s", result)

    async def main_loop(self) -> None:
        await super().main_loop()
        if self.service.state == "failed":  # the model did not load: nothing to serve
            self.exit_code = 1

    async def on_tick(self, counter: int) -> bool:
        if self.service.state == "failed" and not self._stopping:
            logger.error("the model failed to load: %s", self.service.error)
            self.should_exit = True
        return await super().on_tick(counter)


def serve(service: Service, host: str, port: int, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT (drained) or a failed model load; the exit status."""
    config = uvicorn.Config(
        create_app(service), host=host, port=port, log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=log_level == "debug",
        # /v1/stream answers frames over its limit with an error message; far larger ones
        # are refused by the protocol (1009) before they are read whole
        ws_max_size=4 * MAX_FRAME_BYTES,
    )
    server = Server(config, service)
    server.exit_code = 0
    server.run()
    return server.exit_code
