"""The Quart app of shared/spec/api.md: POST /v1/generate, health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from quart import Quart, Response, g, request

from klein_jax.request import ASPECT_RATIOS
from server.auth import ApiKeys
from server.errors import install_error_handler
from server.fetch import ImageFetcher, Resolver
from server.forms import read_form, validate_form
from server.metrics import Metrics
from server.openapi import build_openapi
from server.playground import load_playground
from server.service import GenerateService
from server.settings import Settings

access_log = logging.getLogger("server.access")

_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TIMING_STAGES = ("parse", "fetch", "decode", "prepare", "queue", "generate", "encode")


def create_app(models: Mapping[str, Any], settings: Settings, *, resolver: Resolver | None = None) -> Quart:
    """The server app for `models` (id -> KleinPipeline-like object); the device worker starts with the app.

    Args:
      resolver: async (host, port) -> addresses, used for image_uris hosts; c-ares (server.fetch.DnsResolver) by
        default.
    """
    if not models:
        raise ValueError("create_app needs at least one model")
    app = Quart(__name__, static_folder=None)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, MAX_FORM_PARTS=settings.max_form_parts,
                      MAX_FORM_MEMORY_SIZE=settings.max_body_bytes)
    metrics = Metrics()
    fetcher = ImageFetcher(settings, resolver=resolver)
    service = GenerateService(models, settings, metrics, fetcher)
    keys = ApiKeys(settings.api_keys) if settings.auth else None
    adapters = _lora_adapters(models)
    document = build_openapi(list(models), settings, adapters=list(adapters))
    any_demo = any(getattr(pipe, "is_demo", False) for pipe in models.values())
    app.extensions["klein"] = service
    app.extensions["klein.api_keys"] = keys  # klein-serve replaces the keys on SIGHUP
    install_error_handler(app)

    @app.before_serving
    async def start() -> None:
        await service.start()

    @app.after_serving
    async def stop() -> None:
        await service.stop()

    @app.before_request
    async def begin() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _CLIENT_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.started_s = time.perf_counter()
        g.timings = {}
        g.fields = {}

    @app.after_request
    async def finish(response: Response) -> Response:
        total_ms = (time.perf_counter() - g.get("started_s", time.perf_counter())) * 1000.0
        response.headers["X-Request-ID"] = g.get("request_id", "-")
        model = g.get("fields", {}).get("model")  # known once the form is valid
        if (getattr(models[model], "is_demo", False) if model else any_demo):
            response.headers["X-Klein-Demo"] = "true; random weights, the images are noise"
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.count_request(route, request.method, response.status_code)
        if route == "/v1/generate":
            metrics.observe_stages({**g.get("timings", {}), "total": total_ms})
        _log_access(response.status_code, total_ms)
        return response

    if settings.playground:
        page = load_playground()

        @app.get("/")
        async def playground() -> Response:  # no auth: the page asks for the key, generating needs it
            return Response(page.body, headers=dict(page.headers))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        service.require_ready()
        return {"status": "ready", "compiled_programs": service.compiled_programs,
                "models": {mid: _model_info(mid, pipe) for mid, pipe in models.items()},
                "lora_adapters": {name: {"default_scale": scale} for name, scale in adapters.items()},
                "aspect_ratios": {name: list(ASPECT_RATIOS[name]) for name in settings.aspect_ratios}}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @app.get("/openapi.json")
    async def openapi() -> dict:
        return document

    @app.post("/v1/generate")
    async def generate() -> Response:
        if keys is not None:
            keys.check(request.headers.get("Authorization"))
        service.require_ready()
        try:
            return await service.until_drained(_generate())
        except asyncio.CancelledError:  # the client closed the connection
            metrics.count_request("/v1/generate", "POST", 499)
            _log_access(499, (time.perf_counter() - g.started_s) * 1000.0)
            raise

    async def _generate() -> Response:
        start = time.perf_counter()
        fields, files = await read_form(request, settings)
        g.body_read = True  # errors from here on leave the connection reusable
        form = validate_form(fields, files, settings, list(models), list(adapters))
        g.timings["parse"] = (time.perf_counter() - start) * 1000.0
        width, height = form.size
        g.fields.update(model=form.model, workflow=form.workflow.value, refs=form.num_references,
                        aspect_ratio=form.aspect_ratio, resolution=f"{width}x{height}", seed=form.seed,
                        lora=form.lora)
        result = await service.generate(form, g.timings)
        g.fields.update(seed=result.seed, batch_size=result.batch_size)
        metrics.images.labels(form.model, g.fields["workflow"]).inc()
        return Response(result.png, status=200, content_type="image/png", headers=_result_headers())

    return app


def _result_headers() -> dict[str, str]:
    """Headers of a 200: workflow, seed, model, batch size and per-stage timings."""
    timings = g.timings
    headers = {
        "X-Klein-Workflow": g.fields["workflow"],
        "X-Klein-Seed": str(g.fields["seed"]),
        "X-Klein-Model": g.fields["model"],
        "X-Klein-Batch-Size": str(g.fields["batch_size"]),
        "X-Klein-Queue-Ms": f"{timings.get('queue', 0.0):.1f}",
        "X-Klein-Generate-Ms": f"{timings.get('generate', 0.0):.1f}",
        "Server-Timing": ", ".join(f"{stage};dur={timings[stage]:.1f}" for stage in _TIMING_STAGES if stage in timings),
    }
    return headers


def _lora_adapters(models: Mapping[str, Any]) -> dict[str, float]:
    """name -> default scale of the LoRA adapters the models loaded (klein-serve --lora), in loading order."""
    adapters: dict[str, float] = {}
    for pipe in models.values():
        lora = getattr(pipe, "lora", None)
        adapters.update(getattr(lora, "default_scales", {}))
    return adapters


def _model_info(model_id: str, pipe: Any) -> dict:
    info = dict(getattr(pipe, "model_info", {}) or {})
    info["name"] = model_id  # the pipeline's own name may be the folder it was loaded from: not for clients
    info["is_demo"] = bool(getattr(pipe, "is_demo", False))
    return json.loads(json.dumps(info, default=str))  # JSON-safe whatever the pipeline put there


def _log_access(status: int, total_ms: float) -> None:
    """One JSON line per request (no prompt, no key)."""
    record = {"request_id": g.get("request_id", "-"), "method": request.method, "path": request.path,
              "status": status, "client": request.remote_addr}
    record.update(g.get("fields", {}))
    record.update({f"{stage}_ms": round(ms, 1) for stage, ms in g.get("timings", {}).items()})
    record["total_ms"] = round(total_ms, 1)
    if "error_detail" in g:
        record["detail"] = g.error_detail[:300]
    access_log.info("%s", json.dumps(record, separators=(",", ":")))
