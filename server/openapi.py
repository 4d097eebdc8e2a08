"""The OpenAPI 3.1 document of the server, written by hand: every route, field, header and error."""

from __future__ import annotations

from collections.abc import Sequence

from klein_jax.request import ASPECT_RATIOS, MAX_LORA_SCALE, MAX_PROMPT_CHARS, MAX_REFERENCES, MAX_SEED, Workflow
from server.settings import DEFAULT_MODEL_ID, Settings

_ERROR = {"$ref": "#/components/schemas/Error"}
_METHOD_NOT_ALLOWED = {"description": "Another method than the route's (the Allow header lists them).",
                       "content": {"application/json": {"schema": _ERROR}}}


def _error(description: str, *headers: str) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": _ERROR}}}
    if headers:
        response["headers"] = {name: {"$ref": f"#/components/headers/{name}"} for name in headers}
    return response


def _form_schema(model_ids: Sequence[str], settings: Settings, *, with_files: bool,
                 adapters: Sequence[str] = ()) -> dict:
    properties = {
        "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
                   "description": "Text to generate from; empty or whitespace-only is a 422."},
        "model": {"type": "string", "enum": list(model_ids), "default": DEFAULT_MODEL_ID,
                  "description": "Model id; an id this server has not loaded is a 422 naming the loaded ids."},
        "aspect_ratio": {"type": "string", "enum": list(settings.aspect_ratios),
                         "default": settings.default_aspect_ratio,
                         "description": "Output size: " + ", ".join(f"{n} {w}x{h}" for n, (w, h) in
                                                                    ASPECT_RATIOS.items()) + "."},
        "image_uris": {"type": "string", "contentMediaType": "application/json",
                       "description": "JSON array (as a string) of http(s):// URLs or data:image/...;base64, URIs; "
                                      "fetched after the uploaded files, in order."},
        "seed": {"type": "string", "pattern": f"^[0-9]{{1,{len(str(MAX_SEED))}}}$",
                 "description": f"Optional integer in 0..{MAX_SEED} (2^64-1): the same seed, prompt, inputs and "
                                "model give the same image. Random when absent; the seed used is in X-Klein-Seed."},
        "lora": {"type": "string", **({"enum": list(adapters)} if adapters else {}),
                 "description": "Optional LoRA adapter the server loaded (klein-serve --lora NAME=PATH): "
                                f"{', '.join(adapters) or 'none loaded'}; another name is a 422 listing them."},
        "lora_scale": {"type": "string", "description": f"Optional number in [-{MAX_LORA_SCALE:g}, "
                                                        f"{MAX_LORA_SCALE:g}], with lora only; default: the "
                                                        "adapter's default scale (1.0 unless --lora gave one)."},
    }
    if with_files:
        properties["images"] = {
            "type": "array", "maxItems": MAX_REFERENCES,
            "items": {"type": "string", "contentMediaType": "application/octet-stream"},
            "description": f"Reference images (PNG, JPEG, WEBP, GIF; at most {settings.max_image_bytes} bytes and "
                           f"{settings.max_image_pixels} pixels each); repeat the field. Files + image_uris: 0 "
                           f"{Workflow.TEXT_TO_IMAGE}, 1 {Workflow.IMAGE_TO_IMAGE}, 2-{MAX_REFERENCES} "
                           f"{Workflow.MULTI_REFERENCE}, more is a 422.",
        }
    return {"type": "object", "required": ["prompt"], "properties": properties}


def _generate_operation(model_ids: Sequence[str], settings: Settings, adapters: Sequence[str] = ()) -> dict:
    return {
        "summary": "Generate one image",
        "operationId": "generate",
        "security": [{"bearer": []}] if settings.auth else [],
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": _form_schema(model_ids, settings, with_files=True, adapters=adapters),
                                    "encoding": {"images": {"contentType": "image/png, image/jpeg, image/webp, "
                                                                           "image/gif"}}},
            "application/x-www-form-urlencoded": {"schema": _form_schema(model_ids, settings, with_files=False,
                                                                         adapters=adapters)},
        }},
        "responses": {
            "200": {
                "description": "The image as PNG bytes at exactly the aspect ratio's resolution.",
                "content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}},
                "headers": {name: {"$ref": f"#/components/headers/{name}"} for name in (
                    "X-Request-ID", "X-Klein-Workflow", "X-Klein-Seed", "X-Klein-Model", "X-Klein-Batch-Size",
                    "X-Klein-Queue-Ms", "X-Klein-Generate-Ms", "Server-Timing", "X-Klein-Demo")},
            },
            "401": _error("Missing, malformed or unknown API key.", "WWW-Authenticate"),
            "408": _error("The body did not arrive within the server's body timeout (60 s)."),
            "413": _error(f"Body over {settings.max_body_bytes} bytes (whatever its transfer encoding) or over "
                          f"{settings.max_form_parts} form fields (multipart or urlencoded)."),
            "422": _error("A field failed validation: prompt, model, aspect_ratio, seed, lora, lora_scale, "
                          "image_uris (bad JSON, a "
                          "scheme other than http(s)/data, a forbidden address, an image that cannot be fetched "
                          "or decoded), too many images, an image too large in bytes or pixels, a content type "
                          "other than multipart/form-data or application/x-www-form-urlencoded."),
            "500": _error("Unexpected server error: a generic message with the request id."),
            "503": _error("Not ready (compiling), the queue is full or would take longer than the time limit, or "
                          "the server is shutting down.", "Retry-After"),
            "504": _error(f"Queue wait plus generation exceeded {settings.timeout_s:g} s."),
            "405": _METHOD_NOT_ALLOWED,
        },
    }


def _get(summary: str, operation_id: str, ok: dict, *errors: tuple[str, dict]) -> dict:
    responses = {"200": ok, **dict(errors), "405": _METHOD_NOT_ALLOWED}
    return {"get": {"summary": summary, "operationId": operation_id, "responses": responses}}


def build_openapi(model_ids: Sequence[str], settings: Settings, *, adapters: Sequence[str] = ()) -> dict:
    """The OpenAPI document served at /openapi.json."""
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    header = {"schema": {"type": "string"}}
    html_ok = {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "klein-serve", "version": "1.0.0",
                 "description": "FLUX.2 [klein] image generation (shared/spec/api.md). Every error is JSON "
                                "{\"detail\": ...}, including 404 for a path not listed here; every response carries "
                                "X-Request-ID."},
        "paths": {
            "/v1/generate": {"post": _generate_operation(model_ids, settings, adapters)},
            "/healthz": _get("The process is up", "healthz", json_ok),
            "/readyz": _get("Weights loaded and every program compiled", "readyz", json_ok,
                            ("503", _error("Not ready yet (compiling), start-up failed, the device worker stopped, "
                                           "or the server is shutting down.", "Retry-After"))),
            "/metrics": _get("Prometheus metrics", "metrics", {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}),
            "/openapi.json": _get("This document", "openapi", json_ok),
            **({"/": _get("The playground: an HTML page that calls POST /v1/generate", "playground", html_ok)}
               if settings.playground else {}),
        },
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["detail"], "additionalProperties": False,
                                  "properties": {"detail": {"type": "string"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "headers": {
                "X-Request-ID": {**header, "description": "Id of this request (also in the access log)."},
                "X-Klein-Workflow": {**header, "enum": [workflow.value for workflow in Workflow]},
                "X-Klein-Seed": {**header, "description": "The seed used (integer)."},
                "X-Klein-Model": {**header, "description": "The model id that generated the image."},
                "X-Klein-Batch-Size": {**header, "description": "Requests run together on the device."},
                "X-Klein-Queue-Ms": {**header, "description": "Time spent waiting for the device."},
                "X-Klein-Generate-Ms": {**header, "description": "Time of the batch on the device."},
                "Server-Timing": {**header, "description": "Per-stage durations: parse, fetch, decode, prepare, "
                                                           "queue, generate, encode (ms)."},
                "X-Klein-Demo": {**header, "description": "Present when the model is the --demo model (random "
                                                          "weights, noise images)."},
                "Retry-After": {**header, "description": "Seconds to wait before retrying."},
                "WWW-Authenticate": {**header, "description": "Bearer challenge."},
            },
        },
    }
