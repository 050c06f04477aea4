"""Helpers of the service tests: export folders with random weights, a service run by uvicorn
in a thread of the test process on 127.0.0.1 (port chosen by the OS), bounded polling."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
CTC_DEMO = REPO / "hparams" / "CTC" / "demo.yaml"
STREAMING_DEMO = REPO / "hparams" / "CTC" / "conmamba_streaming_demo.yaml"
START_TIMEOUT_S = 60.0


def export_random(out: Path, seed: int = 3402, name: str | None = None,
                  config: Path = CTC_DEMO) -> Path:
    """An export folder of a CTC configuration (the bidirectional demo's by default) with the
    random weights of ``seed``."""
    from mamba_asr.export import export_untrained

    export_untrained(str(config), out, overrides=["--seed", str(seed)], name=name)
    return out


def wait_for(check: Callable[[], bool], timeout: float = START_TIMEOUT_S,
             what: str = "condition") -> None:
    """Poll ``check`` every 20 ms until it is true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def running(service, ready: bool = True) -> Iterator[str]:
    """Serve ``service`` (a mamba_asr.serving.service.Service) on 127.0.0.1 from a thread;
    yields the base URL (after /ready answers 200 when ``ready``)."""
    import uvicorn

    from mamba_asr.serving.app import create_app

    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=0,
                            log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-service", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), what="server start")
        assert server.started, "the server did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        if ready:
            wait_for(lambda: is_ready(url) or service.state == "failed", what="/ready")
            assert service.state == "ready", service.error
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server thread did not stop"


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` in Prometheus text (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture(scope="session")
def random_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CTC demo export folder named demo-ctc (the service tests' model)."""
    return export_random(tmp_path_factory.mktemp("serve") / "demo-ctc", name="demo-ctc")


@pytest.fixture(scope="session")
def stream_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight export of the causal ConMamba demo configuration
    (hparams/CTC/conmamba_streaming_demo.yaml), named demo-stream: a model that streams."""
    from mamba_asr.export import export_untrained

    out = tmp_path_factory.mktemp("stream") / "demo-stream"
    export_untrained(str(STREAMING_DEMO), out, name="demo-stream")
    return out


@pytest.fixture(scope="session")
def stream_export_words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``stream_export`` with the random weights of seed 11, named stream-ctc: on low-level
    noise (:func:`noise_pcm`) its hypotheses hold spaces (several words, some final long
    before the end), where the configuration's seed writes one long word."""
    return export_random(tmp_path_factory.mktemp("stream") / "stream-ctc", seed=11,
                         name="stream-ctc", config=STREAMING_DEMO)


def noise_pcm(seconds: float, seed: int = 0, rate: int = 16000) -> bytes:
    """Low-level Gaussian noise (0.01 RMS) as 16-bit little-endian PCM."""
    import numpy as np

    noise = 0.01 * np.random.default_rng(seed).standard_normal(round(seconds * rate))
    return np.round(noise * 32768).clip(-32768, 32767).astype("<i2").tobytes()


@pytest.fixture(scope="session")
def clips(demo_corpus: Path) -> list[Path]:
    """Six test-clean recordings of the demo corpus (1.4 to 2.8 s)."""
    return sorted((demo_corpus / "LibriSpeech" / "test-clean").glob("*/*/*.flac"))[:6]
