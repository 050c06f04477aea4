"""The HTTP API (FastAPI): OpenAI's audio transcription endpoint, models, health, readiness,
metrics and reload; and the WebSocket route ``/v1/stream`` (live transcription of raw PCM,
:mod:`mamba_asr.serving.stream_route`; not in the OpenAPI schema).

``create_app(service)`` builds the app around a :class:`~mamba_asr.serving.service.Service`.
Errors are OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, with
4xx statuses for everything a client can cause: 400 unreadable/empty/not audio, 401 no or
wrong API key, 404 unknown model or route, 413 upload or audio too long, 422 missing or
invalid fields, 503 not ready or queue full (with ``Retry-After``), 504 request timeout.
"""


import re
import secrets
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mamba_asr import audio_io
from mamba_asr.serving.batcher import QueueFull
from mamba_asr.serving.service import Result, Service, private_file
from mamba_asr.serving.stream_route import STREAM_ROUTE, serve_stream
from mamba_asr.transcript import render, segments, verbose_json

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
ENGLISH = re.compile(r"^(en|eng|english)([-_][a-z0-9]+)*$", re.IGNORECASE)
FORM_OVERHEAD = 64 * 1024  # multipart framing and the small fields beside the file
RETRY_AFTER_S = 1
TRANSCRIPTIONS = "/v1/audio/transcriptions"
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable", 504: "timeout"}


class APIError(HTTPException):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.param, self.code = param, code


def _error_body(status: int, message: str, param: str | None = None,
                code: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Metrics:
    """ASGI middleware: counts and times every HTTP request by route template, and the
    requests in flight (which draining waits for)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics = self.service.metrics
        self.service.in_flight += 1
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.service.in_flight -= 1
            metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None)
            if route is None:  # the upload limit answers some transcriptions before routing
                route = TRANSCRIPTIONS if scope["path"] == TRANSCRIPTIONS else "unmatched"
            metrics.requests.labels(route, scope["method"], str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)


class _UploadLimit:
    """ASGI middleware: a transcription whose Content-Length is over the upload limit gets
    its 413 (as an OpenAI error) before any of its body is read. Uploads without a length
    (chunked) are cut off by the route's ``max_body_size`` while they stream."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == TRANSCRIPTIONS:
            limit = self.service.settings.max_upload_bytes + FORM_OVERHEAD
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:
                response = JSONResponse(_error_body(413, _too_large(self.service), "file",
                                                    "upload_too_large"), 413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(service: Service) -> str:
    return (f"upload larger than {service.settings.max_upload_mb:g} MB "
            "(the service's --max_upload_mb)")


def create_app(service: Service) -> FastAPI:
    """The FastAPI app serving ``service`` (started and stopped by the app's lifespan)."""
    settings = service.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="Mamba-ASR transcription service",
        summary="OpenAI-compatible speech recognition with ConMamba / Conformer models",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_UploadLimit, service=service)
    app.add_middleware(_Metrics, service=service)
    bearer = HTTPBearer(auto_error=False, description="The service's --api_key")

    def authorized(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        key = settings.api_key
        if key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), key.encode()):
            message = ("no API key: send 'Authorization: Bearer <key>'" if credentials is None
                       else "wrong API key")
            raise APIError(401, message, code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ errors

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 413 and not isinstance(exc, APIError):  # the body limit's own
            message = _too_large(service)
        elif exc.status_code == 404 and not isinstance(exc, APIError):
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        body = _error_body(exc.status_code, message, getattr(exc, "param", None),
                           getattr(exc, "code", None))
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_fields(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for error in exc.errors():
            where = [str(part) for part in error.get("loc", ()) if part not in ("body", "query")]
            param = param or (where[0] if where else None)
            problems.append(f"{'.'.join(where) or 'request'}: {error.get('msg', 'invalid')}")
        return JSONResponse(_error_body(422, "; ".join(problems), param, "invalid_value"), 422)

    # ------------------------------------------------------------------ probes and metrics

    @app.get("/health", summary="The process is up")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded and warmed up (503 before and while draining)",
             responses={503: {"description": "loading, failed or draining"}})
    async def ready() -> JSONResponse:
        model = service.where.ref
        if service.ready:
            return JSONResponse({"status": "ready", "model": model})
        body = {"status": service.state, "model": model}
        if service.error:
            body["detail"] = service.error
        return JSONResponse(body, 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    # ------------------------------------------------------------------ models

    @app.get("/v1/models", summary="The registry's models, versions and aliases",
             dependencies=[Depends(authorized)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(_model_list, service)}

    @app.post("/admin/reload", summary="Load the version --model names now, if it moved",
              dependencies=[Depends(authorized)],
              responses={403: {"description": "no --api_key"},
                         409: {"description": "the new version failed to load"}})
    async def reload() -> dict[str, Any]:
        if settings.api_key is None:
            raise APIError(403, "admin routes need the service to run with --api_key")
        try:
            return await service.reload()
        except Exception as exc:
            raise APIError(409, f"reload failed, still serving {service.where.ref}: {exc}",
                           code="reload_failed") from exc

    # ------------------------------------------------------------------ transcription

    @app.post(
        TRANSCRIPTIONS,
        summary="Transcribe an audio file (OpenAI's audio transcription API)",
        dependencies=[Depends(authorized)],
        max_body_size=settings.max_upload_bytes + FORM_OVERHEAD,
        responses={
            200: {"content": {"text/plain": {}}, "description": "json, text, srt, vtt or "
                  "verbose_json, by response_format"},
            400: {"description": "unreadable, empty or not audio; unsupported language"},
            404: {"description": "unknown model"},
            413: {"description": "upload or audio too long"},
            503: {"description": "not ready, or the queue is full"},
            504: {"description": "timed out"},
        },
    )
    async def transcriptions(
        file: Annotated[UploadFile, File(description="The audio file (any format libsndfile "
                                                     "reads: wav, flac, ogg, mp3, ...)")],
        model: Annotated[str, Form(description="The served model's name, name@alias or "
                                               "name@version")],
        response_format: Annotated[Literal["json", "text", "srt", "vtt", "verbose_json"],
                                   Form()] = "json",
        timestamp_granularities: Annotated[
            list[Literal["word", "segment"]] | None, Form(alias="timestamp_granularities[]")
        ] = None,
        language: Annotated[str | None, Form(description="English only")] = None,
        prompt: Annotated[str | None, Form(description="accepted and ignored")] = None,
        temperature: Annotated[float, Form(ge=0.0, le=1.0,
                                           description="accepted and ignored")] = 0.0,
        stream: Annotated[bool, Form(description="must be false")] = False,
    ) -> Response:
        _check_model_name(service, model)
        if language is not None and not ENGLISH.match(language.strip()):
            raise APIError(400, f"language {language!r}: this service transcribes English "
                           "only ('en')", param="language", code="unsupported_language")
        if stream:
            raise APIError(400, "stream=true is not supported by this endpoint",
                           param="stream", code="unsupported_value")
        if timestamp_granularities and response_format != "verbose_json":
            raise APIError(400, "timestamp_granularities needs response_format=verbose_json",
                           param="timestamp_granularities[]", code="invalid_value")
        if not service.ready:
            raise APIError(503, f"the model is not ready ({service.state})",
                           code="not_ready", headers={"Retry-After": str(RETRY_AFTER_S)})
        wav, rate = await _read_audio(service, file)
        try:
            result = await service.transcribe(wav, rate)
        except QueueFull as exc:
            raise APIError(503, f"the service is busy: {exc}", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except TimeoutError as exc:
            raise APIError(504, f"no transcript within {settings.request_timeout:g} s "
                           "(the service's --request_timeout)", code="timeout") from exc
        return _response(result, response_format, timestamp_granularities or ["segment"])

    @app.websocket(STREAM_ROUTE)
    async def stream(websocket: WebSocket) -> None:
        """Live transcription: binary PCM frames in, JSON partial/final results out."""
        await serve_stream(websocket, service)

    @app.get("/", include_in_schema=False)
    async def root() -> dict[str, Any]:
        return {"service": app.title, "model": service.where.ref,
                "routes": ["/v1/audio/transcriptions", "/v1/stream", "/v1/models", "/health",
                           "/ready", "/metrics", "/docs"]}

    return app


def _check_model_name(service: Service, requested: str) -> None:
    """404 unless ``requested`` is the served model: its name, ``name@version`` (or a prefix
    of the version), or ``name@alias`` for an alias the served version holds."""
    where = service.where
    name, _, tag = requested.strip().partition("@")
    if name == where.name and (
        not tag or tag in where.aliases or tag == where.requested.partition("@")[2]
        or (len(tag) >= 6 and where.version.startswith(tag))
    ):
        return
    raise APIError(404, f"model {requested!r} is not served here; this service serves "
                   f"{where.name!r} ({where.ref})", param="model", code="model_not_found")


async def _read_audio(service: Service, upload: UploadFile) -> tuple[Any, int]:
    """The upload as a mono waveform at the model's rate, and that rate: 400 when it is not
    audio, 413 when longer than ``max_audio_seconds``. The copy lives in the service's private
    folder and is removed whatever happens."""
    name = upload.filename or "file"
    suffix = "".join(c for c in Path(name).suffix if c.isalnum() or c == ".")[:16]
    rate = service.model.transcriber.sample_rate
    with private_file(service.upload_dir, suffix) as path:
        def copy() -> int:
            upload.file.seek(0)
            with open(path, "wb") as out:
                shutil.copyfileobj(upload.file, out)
                return out.tell()

        if await run_in_threadpool(copy) == 0:
            raise APIError(400, f"{name}: empty file", param="file", code="empty_file")
        try:
            # the header first (nothing decoded), then the samples (a header may be wrong)
            _check_duration(service, name, await run_in_threadpool(audio_io.audio_duration, path))
            wav = await run_in_threadpool(audio_io.load_audio, path, rate)
        except audio_io.AudioError as exc:
            raise APIError(400, f"{name}: {exc.reason}", param="file",
                           code="invalid_audio") from exc
    _check_duration(service, name, len(wav) / rate)
    return wav, rate


def _check_duration(service: Service, name: str, seconds: float) -> None:
    limit = service.settings.max_audio_seconds
    if seconds > limit:
        raise APIError(413, f"{name}: {seconds:.1f} s of audio, more than the service's "
                       f"--max_audio_seconds ({limit:g})", param="file", code="audio_too_long")


def _response(result: Result, response_format: str, granularities: list[str]) -> Response:
    t, ref = result.transcript, result.model.ref
    headers = {"X-Model-Version": ref}
    if response_format == "json":
        usage = {"type": "duration", "seconds": round(t.duration, 3)}
        return JSONResponse({"text": t.text, "usage": usage}, headers=headers)
    if response_format == "text":
        return PlainTextResponse(t.text + "\n", headers=headers)
    cues = segments(t.words)
    if response_format in ("srt", "vtt"):
        media = "text/vtt" if response_format == "vtt" else "application/x-subrip"
        return Response(render(t, response_format, cues), media_type=media, headers=headers)
    body = verbose_json(t, cues)
    if "word" not in granularities:
        body.pop("words", None)
    if "segment" not in granularities:
        body.pop("segments", None)
    body["model"] = ref
    return JSONResponse(body, headers=headers)


def _model_list(service: Service) -> list[dict[str, Any]]:
    """OpenAI's model objects: every registry version (``name@version``), alias
    (``name@alias``) and name, or the one export folder served."""
    where = service.where
    served = where.ref
    if not where.in_registry:
        return [_model_object(where.name, where.name, where.version, (), served),
                _model_object(where.ref, where.name, where.version, (), served)]
    from mamba_asr.registry import Registry

    registry = Registry(service.settings.models)
    out = []
    for v in registry.versions():
        out.append(_model_object(f"{v.name}@{v.version}", v.name, v.version, v.aliases,
                                 served, v.added))
    for name, aliases in registry.aliases().items():
        for alias, version in aliases.items():
            out.append(_model_object(f"{name}@{alias}", name, version, (alias,), served))
    for name in sorted({v.name for v in registry.versions()}):
        try:
            v = registry.resolve(name)
        except ValueError:
            continue
        out.append(_model_object(name, name, v.version, v.aliases, served, v.added))
    return out


def _model_object(model_id: str, name: str, version: str, aliases: tuple[str, ...] | list,
                  served: str, added: str | None = None) -> dict[str, Any]:
    from datetime import datetime

    created = int(datetime.fromisoformat(added).timestamp()) if added else 0
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mamba-asr",
            "name": name, "version": version, "aliases": list(aliases),
            "served": f"{name}@{version}" == served}

