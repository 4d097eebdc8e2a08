"""klein-serve: the HTTP server of shared/spec/api.md (create_app, Settings, RequestError)."""

from server.app import create_app
from server.errors import RequestError
from server.settings import DEFAULT_MODEL_ID, Settings

__all__ = ["DEFAULT_MODEL_ID", "RequestError", "Settings", "create_app"]
