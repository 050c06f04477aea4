"""The transcription service (mamba_asr.serving), run by uvicorn in a thread on 127.0.0.1 and
called with the clients users have: the official ``openai`` package and ``httpx``."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import srt
from serving import metric, running, wait_for

from mamba_asr.serving.service import Service, Settings

KEY = "test-key-0123"


@pytest.fixture(scope="module")
def direct(random_export: Path):
    """The served model, loaded directly: the transcripts the service must return."""
    from mamba_asr.transcriber import Transcriber

    return Transcriber.from_folder(random_export)


@pytest.fixture(scope="module")
def served(random_export: Path):
    """The model served with an API key, a 1.5 MB upload limit, 20 s audio limit and a
    300 ms batching window: (base URL, service)."""
    service = Service(Settings(model=str(random_export), api_key=KEY, max_upload_mb=1.5,
                               max_audio_seconds=20.0, max_wait_ms=300.0))
    with running(service) as url:
        yield url, service


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60.0)


def post(url: str, files: dict | None = None, data: dict | None = None, key: str = KEY,
         **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/transcriptions", files=files,
                      data={"model": "demo-ctc", **(data or {})},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60.0, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    """The OpenAI error object of a response with ``status``; returns its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error["message"]


def test_openai_client_gets_every_format(served, direct, clips) -> None:
    url, service = served
    expected = direct.transcribe_file(clips[0])
    assert len(expected.words) >= 1
    c = client(url)
    with open(clips[0], "rb") as f:
        verbose = c.audio.transcriptions.create(
            model="demo-ctc", file=f, response_format="verbose_json",
            timestamp_granularities=["word", "segment"], language="en", prompt="ignored",
            temperature=0.0,
        )
    assert verbose.text == expected.text
    assert verbose.duration == pytest.approx(expected.duration, abs=1e-3)
    assert [w.word for w in verbose.words] == [w.word for w in expected.words]
    assert [w.start for w in verbose.words] == pytest.approx(
        [w.start for w in expected.words], abs=1e-3)
    assert " ".join(s.text for s in verbose.segments) == expected.text
    assert verbose.model_extra["model"] == service.where.ref
    plain = c.audio.transcriptions.create(model="demo-ctc@" + service.where.version,
                                          file=clips[0].open("rb"))
    assert plain.text == expected.text
    text = c.audio.transcriptions.create(model="demo-ctc", file=clips[0].open("rb"),
                                         response_format="text")
    assert text.strip() == expected.text
    subtitles = c.audio.transcriptions.create(model="demo-ctc", file=clips[0].open("rb"),
                                              response_format="srt")
    cues = list(srt.parse(subtitles))
    assert " ".join(cue.content.replace("\n", " ") for cue in cues) == expected.text
    assert cues[-1].end.total_seconds() == pytest.approx(expected.words[-1].end, abs=1e-3)
    vtt = c.audio.transcriptions.create(model="demo-ctc", file=clips[0].open("rb"),
                                        response_format="vtt")
    assert vtt.startswith("WEBVTT") and expected.words[0].word in vtt
    raw = post(url, files={"file": clips[0].open("rb")})
    assert raw.headers["X-Model-Version"] == service.where.ref
    assert raw.json()["usage"] == {"type": "duration",
                                   "seconds": pytest.approx(expected.duration, abs=1e-3)}


def test_api_key_is_required_except_on_probes(served, clips) -> None:
    url, _ = served
    for key in ("wrong-key", ""):
        with pytest.raises(openai.AuthenticationError):
            client(url, key or "x").audio.transcriptions.create(
                model="demo-ctc", file=clips[0].open("rb"))
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert_error(r, 401)
        assert r.headers["WWW-Authenticate"] == "Bearer"
    for probe in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{url}{probe}").status_code == 200
    models = client(url).models.list()
    ids = [m.id for m in models.data]
    assert "demo-ctc" in ids and served[1].where.ref in ids


def test_bad_input_is_a_4xx_with_the_reason(served, clips, tmp_path) -> None:
    url, service = served
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert "empty" in assert_error(post(url, {"file": empty.open("rb")}), 400, "file")
    text = tmp_path / "notes.wav"
    text.write_text("these are not samples\n" * 20)
    assert "not audio" in assert_error(post(url, {"file": text.open("rb")}), 400, "file")
    assert_error(post(url, data={"response_format": "json"}), 422, "file")
    bad = {"file": clips[0].open("rb")}
    assert_error(post(url, bad, {"response_format": "xml"}), 422, "response_format")
    assert_error(post(url, {"file": clips[0].open("rb")}, {"temperature": "2"}), 422,
                 "temperature")
    message = assert_error(post(url, {"file": clips[0].open("rb")}, {"model": "whisper-1"}),
                           404, "model")
    assert "demo-ctc" in message
    with pytest.raises(openai.NotFoundError):
        client(url).audio.transcriptions.create(model="other", file=clips[0].open("rb"))
    with pytest.raises(openai.BadRequestError, match="English"):
        client(url).audio.transcriptions.create(model="demo-ctc", language="fr",
                                                file=clips[0].open("rb"))
    # 30 s of audio in a 0.96 MB file: over --max_audio_seconds (20), under the upload limit
    import numpy as np
    import soundfile as sf

    tiny = tmp_path / "tiny.wav"  # 5 ms: shorter than the front-end's receptive field
    sf.write(tiny, np.full(80, 1000, dtype=np.int16), 16000, subtype="PCM_16")
    r = post(url, {"file": tiny.open("rb")}, {"response_format": "verbose_json"})
    assert r.status_code == 200 and r.json()["duration"] == 0.005
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(30 * 16000, dtype=np.int16), 16000, subtype="PCM_16")
    assert "max_audio_seconds" in assert_error(post(url, {"file": long.open("rb")}), 413)


def test_uploads_over_the_limit_are_refused_while_streaming(served, tmp_path) -> None:
    url, service = served
    limit = int(1.5 * (1 << 20))
    big = tmp_path / "big.wav"
    big.write_bytes(os.urandom(limit + 200_000))
    before = metric(httpx.get(f"{url}/metrics").text, "mamba_asr_requests_total",
                    route="/v1/audio/transcriptions", status="413")
    assert "max_upload_mb" in assert_error(post(url, {"file": big.open("rb")}), 413)
    assert metric(httpx.get(f"{url}/metrics").text, "mamba_asr_requests_total",
                  route="/v1/audio/transcriptions", status="413") == before + 1
    # A chunked upload (no Content-Length) of up to 25 MB, sent 64 KB at a time: the 413 must
    # arrive while it is still streaming.
    host, port = url.removeprefix("http://").split(":")
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: " + host.encode()
                     + b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Type: "
                     b"multipart/form-data; boundary=b0undary\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n")
        head = (b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; "
                b"filename=\"x.wav\"\r\nContent-Type: audio/wav\r\n\r\n")
        for block in [head] + [b"\0" * 65536] * 400:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(block)
            if select.select([sock], [], [], 0.005)[0]:  # paced: the server keeps up
                break
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in answer and (data := sock.recv(65536)):
                answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 2 * limit, f"{sent} bytes sent before the 413"
    # every upload (spooled by Starlette past 1 MB, or our copy) went to the private folder
    # and is gone
    assert tempfile.gettempdir() == str(service.upload_dir)
    assert stat.S_IMODE(service.upload_dir.stat().st_mode) == 0o700
    wait_for(lambda: not any(service.upload_dir.iterdir()), 10, "uploads removed")


def test_concurrent_requests_share_a_forward_pass(served, direct, clips) -> None:
    url, service = served
    before = httpx.get(f"{url}/metrics").text
    batch = clips[:4]
    with ThreadPoolExecutor(len(batch)) as pool:
        responses = list(pool.map(lambda p: post(url, {"file": p.open("rb")}), batch))
    assert [r.status_code for r in responses] == [200] * 4
    after = httpx.get(f"{url}/metrics").text
    passes = (metric(after, "mamba_asr_batch_size_count")
              - metric(before, "mamba_asr_batch_size_count"))
    requests = (metric(after, "mamba_asr_batch_size_sum")
                - metric(before, "mamba_asr_batch_size_sum"))
    assert requests == 4 and passes < 4, (passes, requests)
    if passes == 1:  # one padded batch: the transcripts of the same batch run directly
        expected = [t.text for t in direct.transcribe(batch)]
        assert [r.json()["text"] for r in responses] == expected
    seconds = sum(direct.transcribe_file(p).duration for p in batch)
    audio = (metric(after, "mamba_asr_audio_seconds_total")
             - metric(before, "mamba_asr_audio_seconds_total"))
    assert audio == pytest.approx(seconds, abs=1e-3)
    route = "/v1/audio/transcriptions"
    assert metric(after, "mamba_asr_requests_total", route=route, method="POST",
                  status="200") - metric(before, "mamba_asr_requests_total", route=route,
                                         method="POST", status="200") == 4
    assert metric(after, "mamba_asr_request_duration_seconds_count", route=route) >= 4
    assert metric(after, "mamba_asr_real_time_factor_count") >= 4
    assert metric(after, "mamba_asr_queue_depth") == 0
    assert metric(after, "mamba_asr_model_info", ref=service.where.ref) == 1
    assert metric(after, "process_resident_memory_bytes") > 50e6
    assert (metric(after, "mamba_asr_peak_resident_memory_bytes")
            >= metric(after, "process_resident_memory_bytes"))


@pytest.fixture
def blocked(random_export: Path):
    """A service whose forward passes wait for ``release`` (set it): one job queue slot, a
    1.5 s request timeout, no batching window. Yields (url, service, started, release)."""
    service = Service(Settings(model=str(random_export), max_queue=1, request_timeout=1.5,
                               max_wait_ms=0.0))
    started, release = threading.Event(), threading.Event()
    run_batch = service.batcher.run_batch

    def held(jobs):
        started.set()
        release.wait(30)
        return run_batch(jobs)

    service.batcher.run_batch = held
    with running(service) as url:
        try:
            yield url, service, started, release
        finally:
            release.set()


def test_busy_service_answers_health_503_when_full_and_504_on_timeout(blocked, clips) -> None:
    url, service, started, release = blocked
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, {"file": clips[0].open("rb")})
        assert started.wait(30)  # its forward pass is running (held)
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
        assert time.monotonic() - t0 < 1.0  # not stuck behind inference
        second = pool.submit(post, url, {"file": clips[1].open("rb")})
        wait_for(lambda: service.batcher.depth == 1, 10, "second request queued")
        full = post(url, {"file": clips[2].open("rb")})
        assert_error(full, 503)
        assert full.headers["Retry-After"] == "1"
        with pytest.raises(openai.InternalServerError):  # the openai client: no retries
            client(url).audio.transcriptions.create(model="demo-ctc",
                                                    file=clips[2].open("rb"))
        assert "request_timeout" in assert_error(first.result(), 504)
        assert_error(second.result(), 504)
        assert service.batcher.depth == 0  # the timed-out job left the queue at once
    release.set()
    assert post(url, {"file": clips[0].open("rb")}).status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    route = "/v1/audio/transcriptions"
    for status, n in (("503", 2), ("504", 2), ("200", 1)):
        assert metric(metrics, "mamba_asr_requests_total", route=route, status=status) == n


def test_ready_is_503_until_the_model_is_loaded(random_export: Path, clips) -> None:
    service = Service(Settings(model=str(random_export)))
    loaded = threading.Event()
    load = service._load

    def slow_load(where):
        loaded.wait(30)
        return load(where)

    service._load = slow_load
    with running(service, ready=False) as url:
        try:
            r = httpx.get(f"{url}/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert r.headers["Retry-After"] == "1"
            assert httpx.get(f"{url}/health").status_code == 200
            assert_error(post(url, {"file": clips[0].open("rb")}), 503)
        finally:
            loaded.set()
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 30, "ready")
        assert json.loads(httpx.get(f"{url}/ready").text)["model"] == service.where.ref
        assert post(url, {"file": clips[0].open("rb")}).status_code == 200
