"""The service on a registry alias: switching versions without failing requests in flight
(POST /admin/reload in-process; SIGHUP in a real process), and draining on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving import REPO, export_random, metric, running, wait_for

from mamba_asr.registry import Registry
from mamba_asr.serving.service import Service, Settings

KEY = "reload-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_REQUESTS = 40  # per client thread
MAX_SECONDS = 60.0


@pytest.fixture(scope="module")
def registry(random_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """A registry with demo-ctc v1 (production) and v2 (another seed): (root, v1, v2)."""
    root = tmp_path_factory.mktemp("registry")
    reg = Registry(root)
    v1 = reg.add(random_export, "demo-ctc", alias="production")
    other = export_random(tmp_path_factory.mktemp("v2") / "demo-ctc", seed=7, name="demo-ctc")
    v2 = reg.add(other, "demo-ctc")
    assert v1.version != v2.version
    return root, v1, v2


def transcribe(url: str, clip: Path) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/transcriptions", headers=AUTH, timeout=60.0,
                      files={"file": clip.open("rb")},
                      data={"model": "demo-ctc", "response_format": "verbose_json"})


def test_reload_switches_versions_without_failing_requests(registry, clips) -> None:
    root, v1, v2 = registry
    Registry(root).promote(v1.ref, "production")  # whatever an earlier test left
    service = Service(Settings(model="demo-ctc@production", models=root, api_key=KEY))
    with running(service) as url:
        ids = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]}
        assert {"demo-ctc", "demo-ctc@production", v1.ref, v2.ref} <= ids
        assert httpx.post(f"{url}/admin/reload").status_code == 401
        assert httpx.post(f"{url}/admin/reload", headers=AUTH).json()["changed"] is False
        stop = threading.Event()
        done: list[tuple[float, float, int, str]] = []  # (start, end, status, model)

        def client(k: int) -> None:
            deadline = time.monotonic() + MAX_SECONDS
            for i in range(MAX_REQUESTS):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                start = time.monotonic()
                r = transcribe(url, clips[(k + i) % len(clips)])
                model = r.json().get("model", "") if r.status_code == 200 else r.text
                done.append((start, time.monotonic(), r.status_code, model))

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client, k) for k in range(3)]
            wait_for(lambda: len(done) >= 3, 30, "requests before the reload")
            Registry(root).promote(v2.ref, "production")
            reload_start = time.monotonic()
            answer = httpx.post(f"{url}/admin/reload", headers=AUTH, timeout=60).json()
            reload_end = time.monotonic()
            n_after = len(done)
            wait_for(lambda: len(done) >= n_after + 3, 30, "requests after the reload")
            stop.set()
            for f in futures:
                f.result()
        assert answer == {"changed": True, "model": v2.ref, "previous": v1.ref}
        assert [status for _, _, status, _ in done] == [200] * len(done), done
        through = [d for d in done if d[0] < reload_end and d[1] > reload_start]
        assert through, "no request was in flight during the reload"
        assert {model for start, _, _, model in done if start > reload_end} == {v2.ref}
        assert {model for _, end, _, model in done if end < reload_start} == {v1.ref}
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "mamba_asr_model_info", ref=v2.ref) == 1
        assert metric(text, "mamba_asr_model_info", ref=v1.ref) == 0
        assert metric(text, "mamba_asr_model_reloads_total", result="switched") == 1
        assert httpx.get(f"{url}/ready").json()["model"] == v2.ref


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_process_reloads_on_sighup_and_drains_on_sigterm(registry, clips, tmp_path) -> None:
    root, v1, v2 = registry
    Registry(root).promote(v1.ref, "production")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    # A 2.5 s batching window: requests stay in flight long enough to be drained.
    proc = subprocess.Popen(
        [sys.executable, "serve.py", "--models", str(root), "--model", "demo-ctc@production",
         "--port", str(port), "--max_wait_ms", "2500", "--drain_seconds", "20"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MAMBA_ASR_API_KEY": KEY},
    )
    try:
        wait_for(lambda: _ready_model(url) == v1.ref or proc.poll() is not None, 90, "ready")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        Registry(root).promote(v2.ref, "production")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _ready_model(url) == v2.ref or proc.poll() is not None, 60, "reload")
        assert proc.poll() is None, "SIGHUP killed the server"
        with ThreadPoolExecutor(2) as pool:
            inflight = [pool.submit(transcribe, url, clip) for clip in clips[:2]]
            wait_for(lambda: metric(httpx.get(f"{url}/metrics").text,
                                    "mamba_asr_queue_depth") >= 1, 10, "requests queued")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, 5, "not ready")
            assert httpx.get(f"{url}/ready").json()["status"] == "draining"
            assert httpx.get(f"{url}/health").status_code == 200
            responses = [f.result() for f in inflight]
        assert [r.status_code for r in responses] == [200, 200]
        assert {r.json()["model"] for r in responses} == {v2.ref}
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "reloaded" in text and "draining" in text


def _ready_model(url: str) -> str | None:
    try:
        r = httpx.get(f"{url}/ready", timeout=2)
    except httpx.TransportError:
        return None
    return r.json().get("model") if r.status_code == 200 else None


def test_a_model_that_cannot_load_ends_the_process(registry, tmp_path) -> None:
    root, v1, _ = registry
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    unknown = subprocess.run(
        [sys.executable, "serve.py", "--models", str(root), "--model", "demo-ctc@nosuch",
         "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, env=env,
        timeout=60)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: --model demo-ctc@nosuch:"), unknown.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in v1.path.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    with (damaged / "asr.ckpt").open("ab") as f:
        f.write(b"\0")
    proc = subprocess.run(
        [sys.executable, "serve.py", "--model", str(damaged), "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "asr.ckpt: changed since export" in proc.stderr
