"""Bearer API keys: parsing the key list and checking a request's Authorization header in constant time."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable

from server.errors import RequestError

# RFC 6750 b64token
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)


def parse_api_keys(comma_separated: str | None = None, file_text: str | None = None) -> tuple[str, ...]:
    """Keys from KLEIN_API_KEYS (comma-separated) and KLEIN_API_KEYS_FILE's text (one per line, '#' comments)."""
    keys = [k.strip() for k in (comma_separated or "").split(",")]
    for line in (file_text or "").splitlines():
        line = line.strip()
        if not line.startswith("#"):
            keys.append(line)
    return tuple(dict.fromkeys(k for k in keys if k))


class ApiKeys:
    """The configured keys; check() compares a presented key with every one of them in constant time."""

    def __init__(self, keys: Iterable[str]):
        self._keys = tuple(k.encode() for k in keys)

    def __repr__(self) -> str:  # never show a key, even in a debugger or a traceback
        return f"ApiKeys(<{len(self._keys)} keys>)"

    def check(self, authorization: str | None) -> None:
        """Returns if the header carries a known key; RequestError 401 (WWW-Authenticate: Bearer) otherwise."""
        if not authorization:
            raise _unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        match = _BEARER.fullmatch(authorization.strip())
        if match is None:
            raise _unauthorized("malformed Authorization header: expected 'Bearer <key>'", error="invalid_request")
        presented = match.group(1).encode()
        known = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            known |= hmac.compare_digest(key, presented)
        if not known:
            raise _unauthorized("unknown API key", error="invalid_token")


def _unauthorized(detail: str, *, error: str | None = None) -> RequestError:
    challenge = 'Bearer realm="klein"' + (f', error="{error}"' if error else "")
    return RequestError(401, detail, headers={"WWW-Authenticate": challenge})
