"""Fuzz the service's OpenAPI schema with schemathesis, in-process (ASGI, no socket): whatever
the generated requests hold, the service never answers 5xx."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import wait_for

pytest.importorskip("schemathesis")
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.python import asgi  # noqa: E402

EXAMPLES = 25  # per operation: 6 operations, ~10 s on 2 cores


@pytest.fixture(scope="module")
def schema(random_export: Path):
    from mamba_asr.serving.app import create_app
    from mamba_asr.serving.service import Service, Settings

    service = Service(Settings(model=str(random_export), max_upload_mb=1.0,
                               max_audio_seconds=30.0))
    loaded = schemathesis.openapi.from_asgi("/openapi.json", create_app(service))
    wait_for(lambda: service.state in ("ready", "failed"), what="model loaded")
    assert service.state == "ready", service.error
    yield loaded
    asgi.shutdown_lifespans()  # the app's lifespan: stops its worker, removes its uploads


@contextlib.contextmanager
def lazy_modules_hidden() -> Iterator[None]:
    """Hypothesis reads every new module's ``__file__`` for constants; on SpeechBrain's lazy
    placeholder modules (speechbrain.integrations.*) that attribute imports optional packages
    that are not installed (flair, ...). Hide the placeholders not yet imported meanwhile."""
    from speechbrain.utils.importutils import LazyModule

    hidden = {name: m for name, m in sys.modules.items()
              if isinstance(m, LazyModule) and vars(m).get("lazy_module") is None}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        for name, module in hidden.items():
            sys.modules.setdefault(name, module)


def test_no_request_gets_a_server_error(schema) -> None:
    operations = list(schema.get_all_operations())
    assert len(operations) >= 6  # transcriptions, models, health, ready, metrics, reload
    for result in operations:
        operation = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error])

        with lazy_modules_hidden():
            fuzz()
