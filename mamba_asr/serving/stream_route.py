"""The WebSocket route ``/v1/stream``: live transcription of raw PCM, one
:class:`mamba_asr.streaming.Stream` per connection on the served model.

Protocol (docs/serving.md has the client's view):

- The client connects, with its key as ``Authorization: Bearer <key>`` or, where it cannot set
  headers (browsers), as the subprotocols ``bearer, <key>`` (the server selects ``bearer``).
- It sends binary frames of 16-bit little-endian mono PCM at 16 kHz, any size up to
  :data:`MAX_FRAME_BYTES` (a sample may straddle two frames), then the text frame
  ``{"type": "finish"}``.
- After each binary frame that changed the hypothesis the server sends
  ``{"type": "partial", "text": <the not-yet-final tail>, "words": [<words final since the
  last message>], "seconds": <audio received>}``; after ``finish``
  ``{"type": "final", "text", "words": [<every word>], "duration"}``, then it closes (1000).
- Anything wrong: ``{"type": "error", "code", "message"}``, then a close with the code of
  :data:`CLOSE_CODES` and the error code as its reason.

A stream's model calls run in the service's stream thread (:meth:`Service.in_stream_thread`),
so the event loop keeps answering HTTP requests and other streams meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from mamba_asr.serving.service import Service
from mamba_asr.transcript import Word

logger = logging.getLogger(__name__)

STREAM_ROUTE = "/v1/stream"
SUBPROTOCOL = "bearer"  # Sec-WebSocket-Protocol: bearer, <key>
MAX_FRAME_BYTES = 1 << 20  # 32.8 s of audio in one binary frame
# error code -> WebSocket close code
CLOSE_CODES = {
    "invalid_api_key": 4401,  # no or wrong key (as HTTP 401)
    "not_ready": 1013,  # loading or draining: try again later
    "too_many_streams": 1013,  # --max_streams streams are open: try again later
    "model_cannot_stream": 4501,  # the served model is not causal (as HTTP 501)
    "bad_message": 1003,  # a text frame other than {"type": "finish"}
    "odd_byte_count": 1007,  # the stream ended inside a 16-bit sample
    "audio_too_long": 1008,  # more than --max_audio_seconds of audio
    "idle_timeout": 1008,  # nothing received for --stream_idle_timeout seconds
    "frame_too_large": 1009,  # a binary frame over MAX_FRAME_BYTES
    "server_error": 1011,
}


class StreamError(Exception):
    """Ends a stream with an error frame and the close code of ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def word_json(w: Word) -> dict[str, Any]:
    return {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
            "probability": round(w.probability, 4)}


def offered_key(websocket: WebSocket) -> str | None:
    """The key the client sent: ``Authorization: Bearer <key>``, else the subprotocol after
    ``bearer`` among those it offered; None when it sent neither."""
    scheme, _, credentials = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    offered = websocket.scope.get("subprotocols", [])
    if SUBPROTOCOL in offered:
        rest = offered[offered.index(SUBPROTOCOL) + 1:]
        if rest:
            return rest[0]
    return None


async def _send(websocket: WebSocket, message: dict[str, Any]) -> bool:
    """Send a JSON text frame; False when the client has gone."""
    try:
        await websocket.send_text(json.dumps(message, ensure_ascii=False))
    except (WebSocketDisconnect, RuntimeError, OSError):
        return False
    return True


async def _close(websocket: WebSocket, code: int, reason: str = "") -> None:
    try:
        await websocket.close(code, reason.encode()[:123].decode(errors="ignore"))
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


async def serve_stream(websocket: WebSocket, service: Service) -> None:
    """One ``/v1/stream`` connection, from the handshake to the close (module docstring)."""
    settings, metrics = service.settings, service.metrics
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    try:
        if settings.api_key is not None:
            key = offered_key(websocket)
            if key is None or not secrets.compare_digest(key.encode(), settings.api_key.encode()):
                raise StreamError("invalid_api_key", "wrong API key" if key else
                                  "no API key: send 'Authorization: Bearer <key>' or the "
                                  "subprotocols 'bearer', '<key>'")
        if not service.ready or service.model is None:
            raise StreamError("not_ready", f"the model is not ready ({service.state})")
        if service.streams >= settings.max_streams:
            raise StreamError("too_many_streams", f"{service.streams} of {settings.max_streams} "
                              "streams open (the service's --max_streams): try again later")
    except StreamError as exc:
        await _fail(websocket, service, exc)
        return
    service.streams += 1  # no await since the check: the count cannot pass the limit
    service.in_flight += 1
    metrics.streams_active.inc()
    end = "disconnected"
    try:
        end = await _session(websocket, service)
    except StreamError as exc:
        end = "error"
        await _fail(websocket, service, exc)
    except WebSocketDisconnect:
        pass
    except Exception as exc:  # the model failed: the client learns it, the log has the rest
        logger.exception("stream failed")
        end = "error"
        await _fail(websocket, service, StreamError("server_error", f"{type(exc).__name__}: "
                                                    f"{exc}"))
    finally:
        service.streams -= 1
        service.in_flight -= 1
        metrics.streams_active.dec()
        metrics.streams.labels(end).inc()


async def _fail(websocket: WebSocket, service: Service, exc: StreamError) -> None:
    service.metrics.stream_errors.labels(exc.code).inc()
    if await _send(websocket, {"type": "error", "code": exc.code, "message": str(exc)}):
        await _close(websocket, CLOSE_CODES[exc.code], exc.code)


async def _session(websocket: WebSocket, service: Service) -> str:
    """Feed the client's audio to a new stream until ``finish``; 'final' or 'disconnected'."""
    from mamba_asr.streaming import pcm16_to_float

    settings = service.settings
    model = service.model  # this stream stays on it, should a reload switch meanwhile
    try:
        stream = await service.in_stream_thread(model.transcriber.stream)
    except ValueError as exc:
        raise StreamError("model_cannot_stream", f"{model.ref} cannot stream: {exc}") from exc
    max_bytes = 2 * int(settings.max_audio_seconds * stream.sample_rate)
    received = 0
    pending = b""  # an odd byte: the first half of a sample the next frame completes
    partial = ""
    while True:
        try:
            message = await asyncio.wait_for(websocket.receive(),
                                             settings.stream_idle_timeout)
        except TimeoutError:
            raise StreamError("idle_timeout", "nothing received for "
                              f"{settings.stream_idle_timeout:g} s (the service's "
                              "--stream_idle_timeout)") from None
        if message["type"] == "websocket.disconnect":
            return "disconnected"
        data = message.get("bytes")
        if data is None:
            if _is_finish(message.get("text")):
                break
            raise StreamError("bad_message", 'text frames: {"type": "finish"} only (audio '
                              "goes in binary frames)")
        if len(data) > MAX_FRAME_BYTES:
            raise StreamError("frame_too_large", f"binary frame of {len(data)} bytes: at "
                              f"most {MAX_FRAME_BYTES} bytes per frame")
        received += len(data)
        if received > max_bytes:
            raise StreamError("audio_too_long", "more than "
                              f"{settings.max_audio_seconds:g} s of audio (the service's "
                              "--max_audio_seconds)")
        data, pending = pending + data, b""
        if len(data) % 2:
            data, pending = data[:-1], data[-1:]
        if not data:
            continue
        samples = pcm16_to_float(data)
        service.metrics.stream_audio_seconds.inc(len(samples) / stream.sample_rate)
        update = await service.in_stream_thread(stream.feed, samples)
        if update.words or update.partial != partial:
            partial = update.partial
            sent = await _send(websocket, {"type": "partial", "text": update.partial,
                                           "words": [word_json(w) for w in update.words],
                                           "seconds": round(update.seconds, 3)})
            if not sent:
                return "disconnected"
    if pending:
        raise StreamError("odd_byte_count", f"the audio ended inside a sample ({received} "
                          "bytes): 16-bit PCM has an even number of bytes")
    transcript = await service.in_stream_thread(stream.finish)
    if not await _send(websocket, {"type": "final", "text": transcript.text,
                                   "words": [word_json(w) for w in transcript.words],
                                   "duration": round(transcript.duration, 3)}):
        return "disconnected"
    await _close(websocket, 1000)
    return "final"


def _is_finish(text: str | None) -> bool:
    try:
        message = json.loads(text or "")
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("type") == "finish"
