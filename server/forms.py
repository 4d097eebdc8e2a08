"""Reading and validating the POST /v1/generate form (multipart or urlencoded) within the size limits.

The request rules themselves (prompt, seed, reference count, aspect ratios) are klein_jax/request.py's, the same
the pipeline applies; their ValueErrors become 422s here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator, Sequence

from quart import Request
from quart.formparser import FormDataParser
from werkzeug.datastructures import MultiDict

from klein_jax.request import Workflow, check_prompt, check_reference_count, parse_seed, resolve_aspect_ratio
from server.errors import RequestError
from server.settings import DEFAULT_MODEL_ID, Settings

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
SCALAR_FIELDS = ("prompt", "model", "aspect_ratio", "seed", "image_uris")


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
    """(text fields, files) of the body; 413 past the body or part limits, 422 for other content types."""
    if request.mimetype not in FORM_TYPES:
        shown = request.mimetype or "none"
        raise RequestError(422, f"Content-Type {shown!r} is not accepted: send {' or '.join(FORM_TYPES)}")
    parser = FormDataParser(
        max_content_length=settings.max_body_bytes,
        max_form_memory_size=settings.max_body_bytes,  # one field may hold several data: URIs
        max_form_parts=settings.max_form_parts,
        silent=False,
        stream_factory=lambda total, content_type, filename, length: _BoundedSpool(settings.max_image_bytes, filename),
    )
    try:
        return await asyncio.wait_for(parser.parse(request.body, request.mimetype, request.content_length,
                                                   request.mimetype_params), request.body_timeout)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {request.body_timeout} s") from None
    except UnicodeDecodeError:
        raise RequestError(422, "form body is not valid UTF-8") from None
    except ValueError as e:  # werkzeug's multipart decoder: missing boundary, broken part headers...
        raise RequestError(422, f"malformed {request.mimetype} body: {e}") from None


def validate_form(fields: MultiDict, files: MultiDict, settings: Settings, model_ids: Sequence[str]) -> GenerateForm:
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
