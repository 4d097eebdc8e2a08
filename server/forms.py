"""Reading and validating the POST /v1/generate form (multipart or urlencoded) within the size limits.

The request rules themselves (prompt, seed, reference count, aspect ratios) are klein_jax/request.py's, the same
the pipeline applies; their ValueErrors become 422s here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Sequence

from quart import Request
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData, State

from klein_jax.request import (Workflow, check_lora_scale, check_prompt, check_reference_count, parse_seed,
                               resolve_aspect_ratio)
from server.errors import RequestError
from server.settings import DEFAULT_MODEL_ID, Settings

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
SCALAR_FIELDS = ("prompt", "model", "aspect_ratio", "seed", "image_uris", "lora", "lora_scale")
_PARSE_INLINE_BYTES = 64 * 1024  # larger urlencoded bodies are parsed in a thread


@dataclasses.dataclass(frozen=True)
class Upload:
    """One uploaded reference image, still encoded."""

    filename: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class GenerateForm:
    """A validated request: the references are uploads first, then image_uris, in order."""

    prompt: str
    model: str
    aspect_ratio: str
    seed: int | None
    uploads: tuple[Upload, ...] = ()
    image_uris: tuple[str, ...] = ()
    lora: str | None = None  # a LoRA adapter the server loaded (klein-serve --lora NAME=PATH)
    lora_scale: float | None = None  # None: the adapter's default scale

    @property
    def num_references(self) -> int:
        """Uploaded files plus image_uris."""
        return len(self.uploads) + len(self.image_uris)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image to generate, from the aspect ratio."""
        return resolve_aspect_ratio(self.aspect_ratio)

    @property
    def workflow(self) -> Workflow:
        """The workflow the number of references picks."""
        return Workflow.for_references(self.num_references)


class _BoundedSpool(tempfile.SpooledTemporaryFile):
    """Where one uploaded file is streamed: refuses to grow past max_bytes (kept in memory up to 1 MiB)."""

    def __init__(self, max_bytes: int, filename: str | None):
        super().__init__(max_size=1024 * 1024)
        self.max_bytes = max_bytes
        self.filename = filename
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise RequestError(422, f"uploaded image {self.filename!r} is larger than {self.max_bytes} bytes")
        return super().write(data)


async def read_form(request: Request, settings: Settings) -> tuple[MultiDict, MultiDict]:
    """(text fields, files) of the body, counting its bytes as they arrive whatever the transfer encoding: 413 past
    max_body_bytes or max_form_parts, 408 past the body timeout, 422 for a malformed body or another content type."""
    if request.mimetype not in FORM_TYPES:
        shown = request.mimetype or "none"
        raise RequestError(422, f"Content-Type {shown!r} is not accepted: send {' or '.join(FORM_TYPES)}")
    try:
        async with asyncio.timeout(request.body_timeout):
            if request.mimetype == "multipart/form-data":
                return await _read_multipart(request, settings)
            return await _read_urlencoded(request, settings)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {request.body_timeout} s") from None


async def _body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks; RequestEntityTooLarge (413) as soon as more than `limit` bytes have arrived."""
    size = 0
    async for chunk in request.body:
        size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge()
        yield chunk


async def _read_multipart(request: Request, settings: Settings) -> tuple[MultiDict, MultiDict]:
    boundary = request.mimetype_params.get("boundary", "")
    if not boundary:
        raise RequestError(422, "malformed multipart/form-data body: the Content-Type has no boundary")
    decoder = MultipartDecoder(boundary.encode("latin-1", "replace"), settings.max_body_bytes,
                               max_parts=settings.max_form_parts)
    form = _MultipartForm(settings)
    try:
        async for chunk in _body(request, settings.max_body_bytes):
            decoder.receive_data(chunk)
            form.take(decoder)
        decoder.receive_data(None)
        form.take(decoder)
    except ValueError as e:  # werkzeug's decoder: broken part headers, a body that ends early...
        raise RequestError(422, f"malformed multipart/form-data body: {_multipart_problem(decoder, e)}") from None
    return MultiDict(form.fields), MultiDict(form.files)


def _multipart_problem(decoder: MultipartDecoder, error: ValueError) -> str:
    if decoder.complete and decoder.state == State.PREAMBLE:
        return "no part starts with the boundary of its Content-Type"
    if decoder.complete and decoder.state in (State.PART, State.DATA, State.DATA_START):
        return "it ends before the closing boundary (a truncated upload?)"
    return str(error)[:200]


class _MultipartForm:
    """Collects the decoder's events: text fields in memory (UTF-8), files in bounded spools."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.fields: list[tuple[str, str]] = []
        self.files: list[tuple[str, FileStorage]] = []
        self._part: Field | File | None = None
        self._text: list[bytes] = []
        self._spool: _BoundedSpool | None = None

    def take(self, decoder: MultipartDecoder) -> None:
        """Handles every event the decoder has ready."""
        while not isinstance(event := decoder.next_event(), (NeedData, Epilogue)):
            if isinstance(event, (Field, File)):
                if not event.name:
                    raise RequestError(422, "malformed multipart/form-data body: a part has no name")
                self._part, self._text = event, []
                self._spool = _BoundedSpool(self.settings.max_image_bytes, event.filename) \
                    if isinstance(event, File) else None
            elif isinstance(event, Data):
                if self._spool is not None:
                    self._spool.write(event.data)
                else:
                    self._text.append(event.data)
                if not event.more_data:
                    self._finish()

    def _finish(self) -> None:
        name = self._part.name
        if self._spool is not None:
            self._spool.seek(0)
            self.files.append((name, FileStorage(self._spool, filename=self._part.filename, name=name)))
            return
        try:
            self.fields.append((name, b"".join(self._text).decode("utf-8")))
        except UnicodeDecodeError:
            raise RequestError(422, f"field {name!r} is not valid UTF-8") from None


async def _read_urlencoded(request: Request, settings: Settings) -> tuple[MultiDict, MultiDict]:
    body = b"".join([chunk async for chunk in _body(request, settings.max_body_bytes)])
    for count, _ in enumerate(re.finditer(rb"[^&]+", body), 1):  # stops at the first field past the limit
        if count > settings.max_form_parts:
            raise RequestEntityTooLarge()
    try:
        if len(body) < _PARSE_INLINE_BYTES:
            pairs = _parse_urlencoded(body)
        else:  # image_uris may hold data: URIs of many MB: unquote them off the event loop
            pairs = await asyncio.to_thread(_parse_urlencoded, body)
    except UnicodeDecodeError:
        raise RequestError(422, "form body is not valid UTF-8") from None
    return MultiDict(pairs), MultiDict()


def _parse_urlencoded(body: bytes) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")


def validate_form(fields: MultiDict, files: MultiDict, settings: Settings, model_ids: Sequence[str],
                  adapters: Sequence[str] = ()) -> GenerateForm:
    """A GenerateForm from the parsed body; RequestError 422 naming the first field that fails."""
    for name in SCALAR_FIELDS:
        if len(fields.getlist(name)) > 1:
            raise RequestError(422, f"field {name!r} was sent {len(fields.getlist(name))} times; send it once")
    if "images" in fields:
        raise RequestError(422, "images must be uploaded files (multipart/form-data); put URLs and data: URIs "
                                "in image_uris")
    unexpected = sorted(set(files) - {"images"})
    if unexpected:
        raise RequestError(422, f"unexpected file field(s) {', '.join(map(repr, unexpected))}; upload reference "
                                "images as 'images'")
    form = GenerateForm(
        prompt=_prompt(fields.get("prompt")),
        model=_model(fields.get("model"), model_ids),
        aspect_ratio=_aspect_ratio(fields.get("aspect_ratio"), settings),
        seed=_seed(fields.get("seed")),
        uploads=_uploads(files.getlist("images")),
        image_uris=_image_uris(fields.get("image_uris")),
        **_lora(fields.get("lora"), fields.get("lora_scale"), adapters),
    )
    with _as_422():
        check_reference_count(form.num_references,
                              sources=f"{len(form.uploads)} files + {len(form.image_uris)} image_uris")
    return form


@contextlib.contextmanager
def _as_422() -> Iterator[None]:
    """klein_jax.request's ValueErrors (their messages name the field) as 422s."""
    try:
        yield
    except ValueError as e:
        raise RequestError(422, str(e)) from None


def _prompt(value: str | None) -> str:
    if value is None:
        raise RequestError(422, "prompt is required")
    with _as_422():
        return check_prompt(value)


def _model(value: str | None, model_ids: Sequence[str]) -> str:
    model = DEFAULT_MODEL_ID if value is None or value == "" else value
    if model not in model_ids:
        raise RequestError(422, f"model {model!r} is not loaded; this server has: {', '.join(model_ids)}")
    return model


def _aspect_ratio(value: str | None, settings: Settings) -> str:
    name = settings.default_aspect_ratio if value is None or value == "" else value
    with _as_422():
        resolve_aspect_ratio(name)
    if name not in settings.aspect_ratios:
        raise RequestError(422, f"aspect_ratio {name!r} is not enabled on this server; use one of "
                                f"{', '.join(settings.aspect_ratios)}")
    return name


def _seed(value: str | None) -> int | None:
    if value is None or value.strip() == "":
        return None
    with _as_422():
        return parse_seed(value)


def _lora(name: str | None, scale: str | None, adapters: Sequence[str]) -> dict:
    """lora and lora_scale (shared/spec/api.md): a loaded adapter's name, a finite number in [-4, 4]."""
    name = None if name is None or name == "" else name
    scale = None if scale is None or scale.strip() == "" else scale
    if name is None:
        if scale is not None:
            raise RequestError(422, "lora_scale was given without lora; name an adapter or leave lora_scale out")
        return {}
    if name not in adapters:
        raise RequestError(422, f"lora {name[:80]!r} is not loaded; this server has: {', '.join(adapters) or 'none'}")
    if scale is None:
        return {"lora": name}
    try:
        value = float(scale)
    except ValueError:
        value = scale
    with _as_422():
        return {"lora": name, "lora_scale": check_lora_scale(value)}


def _uploads(storages: list) -> tuple[Upload, ...]:
    uploads = []
    for storage in storages:
        data = storage.stream.read()
        if not data and not storage.filename:
            continue  # a browser form's empty file input
        uploads.append(Upload(storage.filename or f"images[{len(uploads)}]", data))
    return tuple(uploads)


def _image_uris(value: str | None) -> tuple[str, ...]:
    if value is None or value.strip() == "":
        return ()
    try:
        uris = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise RequestError(422, f"image_uris is not valid JSON ({str(e)[:100]}); send a JSON array of "
                                "strings") from None
    if not isinstance(uris, list) or not all(isinstance(uri, str) for uri in uris):
        raise RequestError(422, "image_uris must be a JSON array of strings")
    for i, uri in enumerate(uris):
        scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
        if scheme not in ("http", "https", "data"):
            raise RequestError(422, f"image_uris[{i}]: only http://, https:// and data:image/...;base64, URIs "
                                    f"are accepted, got {uri[:80]!r}")
    return tuple(uris)
