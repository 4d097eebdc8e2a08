"""Bearer API keys: parsing the key list and checking a request's Authorization header in constant time."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable

from server.errors import RequestError

# RFC 6750 b64token
_TOKEN = r"[A-Za-z0-9\-._~+/]+=*"
_BEARER = re.compile(rf"Bearer +({_TOKEN})", re.IGNORECASE)


def parse_api_keys(comma_separated: str | None = None, file_text: str | None = None) -> tuple[str, ...]:
    """Keys from KLEIN_API_KEYS (comma-separated) and KLEIN_API_KEYS_FILE's text (one per line, '#' comments).

    ValueError, naming where the key is but never the key, for one that a Bearer header cannot carry (RFC 6750:
    letters, digits, -._~+/ and trailing =): such a key could never authenticate.
    """
    keys = [(k.strip(), f"KLEIN_API_KEYS entry {i}") for i, k in enumerate((comma_separated or "").split(","), 1)]
    for number, line in enumerate((file_text or "").splitlines(), 1):
        line = line.strip()
        if not line.startswith("#"):
            keys.append((line, f"KLEIN_API_KEYS_FILE line {number}"))
    for key, where in keys:
        if key and not re.fullmatch(_TOKEN, key):
            raise ValueError(f"the API key at {where} has characters that RFC 6750 does not allow in a Bearer token "
                             "(use letters, digits and -._~+/, with = only at the end)")
    return tuple(dict.fromkeys(key for key, _ in keys if key))


class ApiKeys:
    """The configured keys; check() compares a presented key with every one of them in constant time."""

    def __init__(self, keys: Iterable[str]):
        self._keys = tuple(k.encode() for k in keys)

    def replace(self, keys: Iterable[str]) -> None:
        """Serves `keys` from now on (klein-serve reloads them on SIGHUP)."""
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
