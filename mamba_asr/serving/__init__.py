"""The transcription service: an OpenAI-compatible HTTP API over an exported model
(``serve.py``): ``app`` (routes), ``service`` (model, readiness, draining), ``batcher``
(batching across requests), ``metrics`` (Prometheus), ``models`` (locating and loading the
model), ``server`` (uvicorn with the service's own signal handling)."""
