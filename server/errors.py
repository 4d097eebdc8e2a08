"""The server's one error type and the one handler that renders every error as JSON {"detail": ...}."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from quart import Quart, Response, current_app, g, json, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

log = logging.getLogger(__name__)


class RequestError(Exception):
    """An answer other than 200: status, a detail a client can act on, and optional headers."""

    def __init__(self, status: int, detail: str, *, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


def json_error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    """A response with body {"detail": detail}."""
    return Response(json.dumps({"detail": detail}), status=status, headers=dict(headers or {}),
                    content_type="application/json")


def _from_http_exception(error: HTTPException) -> RequestError:
    """Quart/werkzeug's own errors (404, 405, 413, 408...) as a RequestError with the same status."""
    headers = {}
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        headers["Allow"] = ", ".join(sorted(error.valid_methods))
    detail = {
        404: "not found: see /openapi.json for the routes of this server",
        413: (f"request body too large: at most {current_app.config['MAX_CONTENT_LENGTH']} bytes "
              f"and {current_app.config['MAX_FORM_PARTS']} form fields"),
    }.get(error.code, error.description or error.name)
    if error.code == 405:
        detail = f"method not allowed; this route accepts {headers.get('Allow', 'other methods')}"
    if error.code == 413:  # the rest of the body is not read: the connection cannot carry another request
        headers["Connection"] = "close"
    return RequestError(error.code or 500, detail, headers=headers)


def install_error_handler(app: Quart) -> None:
    """Registers the handler that turns every exception into a JSON error response."""

    @app.errorhandler(Exception)
    async def handle(error: Exception) -> Response:
        if isinstance(error, HTTPException):
            error = _from_http_exception(error)
        if not isinstance(error, RequestError):
            request_id = g.get("request_id", "-")
            log.error("request %s failed", request_id, exc_info=error)
            error = RequestError(500, f"internal server error; request id {request_id}")
        g.error_detail = error.detail
        headers = dict(error.headers)
        if _body_left_unread():  # the connection cannot carry another request: say so, or a client reusing it fails
            headers["Connection"] = "close"
        return json_error(error.status, error.detail, headers)


def _body_left_unread() -> bool:
    """True if the request came with a body that the app answered before reading to its end (a 401, a 413...)."""
    has_body = bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    return has_body and not g.get("body_read", False)
