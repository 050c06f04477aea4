"""The WebSocket route ``/v1/stream`` of the service (uvicorn in a thread on 127.0.0.1) with the
``websockets`` client: PCM frames of random sizes give the HTTP route's transcript; auth,
stream count, audio length, frame size, idle time and message limits close with their codes.
Every receive has a timeout and every loop a bound."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import metric, noise_pcm, running, wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from mamba_asr.serving.service import Service, Settings
from mamba_asr.serving.stream_route import MAX_FRAME_BYTES

KEY = "test-key-0123"
SR = 16000
SECONDS = 4.0
RECV_TIMEOUT_S = 30.0
MAX_MESSAGES = 500


@pytest.fixture(scope="module")
def served(stream_export_words: Path):
    """The streaming model served with a key, 2 streams at most, 6 s of audio per stream:
    (base URL, service)."""
    service = Service(Settings(model=str(stream_export_words), api_key=KEY, max_streams=2,
                               max_audio_seconds=6.0, stream_idle_timeout=10.0))
    with running(service) as url:
        yield url, service


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/stream"


@contextlib.contextmanager
def stream_to(url: str, key: str | None = KEY, subprotocols: list[str] | None = None
              ) -> Iterator[ClientConnection]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else None
    with connect(ws_url(url), additional_headers=headers, subprotocols=subprotocols,
                 open_timeout=10, close_timeout=5) as ws:
        yield ws


def until_closed(ws: ClientConnection) -> tuple[list[dict], int, str]:
    """Every message the server sends until it closes: (messages, close code, reason)."""
    messages = []
    for _ in range(MAX_MESSAGES):
        try:
            messages.append(json.loads(ws.recv(timeout=RECV_TIMEOUT_S)))
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            return messages, closed.rcvd.code, closed.rcvd.reason
    raise AssertionError(f"more than {MAX_MESSAGES} messages")


def assert_refused(ws: ClientConnection, code: str, close: int) -> str:
    """The error frame ``code`` then the close ``close``; returns the message."""
    messages, got_close, reason = until_closed(ws)
    assert messages[-1]["type"] == "error", messages
    assert messages[-1]["code"] == code and messages[-1]["message"]
    assert all(m["type"] == "partial" for m in messages[:-1])
    assert (got_close, reason) == (close, code)
    return messages[-1]["message"]


def http_transcript(url: str, wav: bytes) -> dict:
    response = httpx.post(f"{url}/v1/audio/transcriptions",
                          files={"file": ("noise.wav", wav, "audio/wav")},
                          data={"model": "stream-ctc", "response_format": "verbose_json",
                                "timestamp_granularities[]": "word"},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60.0)
    assert response.status_code == 200, response.text
    return response.json()


def as_wav(pcm: bytes) -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.frombuffer(pcm, "<i2"), SR, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_stream_gives_the_http_transcript(served) -> None:
    """Random frame sizes (odd ones too: a sample may straddle frames), an HTTP transcription
    answered while the stream is open; partials with new final words and stream times, then
    the final transcript equal to the HTTP one and a normal close; metrics counted."""
    url, service = served
    pcm = noise_pcm(SECONDS)
    before = httpx.get(f"{url}/metrics").text
    expected = http_transcript(url, as_wav(pcm))
    assert len(expected["words"]) >= 5
    rng = np.random.default_rng(1)
    with stream_to(url) as ws:
        sent = 0
        for _ in range(1000):
            if sent >= len(pcm):
                break
            size = int(rng.integers(1, 12000))
            ws.send(pcm[sent:sent + size])
            sent += size
            if sent >= len(pcm) // 2 > sent - size:  # the batcher answers meanwhile
                assert http_transcript(url, as_wav(pcm))["text"] == expected["text"]
        ws.send(json.dumps({"type": "finish"}))
        messages, code, _ = until_closed(ws)
    assert code == 1000
    *partials, final = messages
    assert final["type"] == "final"
    assert final["text"] == expected["text"]
    assert final["duration"] == pytest.approx(SECONDS)
    assert [(w["word"], w["start"], w["end"]) for w in final["words"]] == [
        (w["word"], pytest.approx(w["start"], abs=1e-3), pytest.approx(w["end"], abs=1e-3))
        for w in expected["words"]]
    assert len(partials) >= 3 and all(m["type"] == "partial" for m in partials)
    seconds = [m["seconds"] for m in partials]
    assert seconds == sorted(seconds) and 0 < seconds[-1] <= SECONDS
    streamed = [w["word"] for m in partials for w in m["words"]]
    assert streamed and streamed == [w["word"] for w in final["words"]][:len(streamed)]
    after = httpx.get(f"{url}/metrics").text
    audio = "mamba_asr_stream_audio_seconds_total"
    assert metric(after, audio) - metric(before, audio) == pytest.approx(SECONDS)
    wait_for(lambda: service.streams == 0, 10, "stream closed")
    ended = httpx.get(f"{url}/metrics").text
    assert metric(ended, "mamba_asr_streams_total", end="final") == metric(
        before, "mamba_asr_streams_total", end="final") + 1
    assert metric(ended, "mamba_asr_streams_active") == 0


def test_key_as_subprotocol_and_refusals(served) -> None:
    """The key as subprotocols 'bearer', '<key>' (the server selects 'bearer'); a missing or
    wrong key, in the header or the subprotocol: error frame, close 4401."""
    url, service = served
    with stream_to(url, key=None, subprotocols=["bearer", KEY]) as ws:
        assert ws.subprotocol == "bearer"
        ws.send(noise_pcm(0.5))
        ws.send(json.dumps({"type": "finish"}))
        messages, code, _ = until_closed(ws)
        assert code == 1000 and messages[-1]["type"] == "final"
    before = httpx.get(f"{url}/metrics").text
    for key, subprotocols in ((None, None), ("wrong", None), (None, ["bearer", "wrong"])):
        with stream_to(url, key=key, subprotocols=subprotocols) as ws:
            message = assert_refused(ws, "invalid_api_key", 4401)
            assert message.startswith("wrong API key" if key or subprotocols else "no API key")
    after = httpx.get(f"{url}/metrics").text
    name = "mamba_asr_stream_errors_total"
    assert metric(after, name, code="invalid_api_key") - metric(
        before, name, code="invalid_api_key") == 3


def test_limits_close_with_their_codes(served) -> None:
    """A third stream beside two open ones: 1013 (and one once they closed is taken); over
    max_audio_seconds: 1008; a frame over 1 MiB: 1009; a text frame that is not finish: 1003;
    an odd byte count at finish: 1007; nothing sent for stream_idle_timeout: 1008."""
    url, service = served
    with stream_to(url) as first, stream_to(url) as second:
        wait_for(lambda: service.streams == 2, 10, "two streams open")
        with stream_to(url) as third:
            assert "2 of 2 streams open" in assert_refused(third, "too_many_streams", 1013)
        for ws in (first, second):
            ws.send(noise_pcm(0.5))
            ws.send(json.dumps({"type": "finish"}))
            messages, code, _ = until_closed(ws)
            assert code == 1000 and messages[-1]["type"] == "final"
            assert messages[-1]["duration"] == 0.5
    second_of_audio = bytes(2 * SR)
    with stream_to(url) as ws:
        for _ in range(7):  # 7 s of silence, one second a frame: the 7th is refused
            ws.send(second_of_audio)
        assert "6 s" in assert_refused(ws, "audio_too_long", 1008)
    with stream_to(url) as ws:
        ws.send(bytes(MAX_FRAME_BYTES + 2))
        assert_refused(ws, "frame_too_large", 1009)
    with stream_to(url) as ws:
        ws.send("hello")
        assert_refused(ws, "bad_message", 1003)
    with stream_to(url) as ws:
        ws.send(b"\x00\x01\x02")
        ws.send(json.dumps({"type": "finish"}))
        assert_refused(ws, "odd_byte_count", 1007)
    service.settings.stream_idle_timeout = 0.3
    try:
        with stream_to(url) as ws:
            assert_refused(ws, "idle_timeout", 1008)
    finally:
        service.settings.stream_idle_timeout = 10.0
    wait_for(lambda: service.streams == 0, 10, "streams closed")


def test_model_that_cannot_stream_is_refused(random_export: Path) -> None:
    """The bidirectional demo model: error frame model_cannot_stream (naming why), close
    4501."""
    service = Service(Settings(model=str(random_export)))
    with running(service) as url, stream_to(url, key=None) as ws:
        message = assert_refused(ws, "model_cannot_stream", 4501)
        assert "cannot stream" in message
