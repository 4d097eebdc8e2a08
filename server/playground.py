"""The playground page served at `/` (shared/spec/api.md): one HTML file with inline style and script, and the
headers that lock it down (a Content-Security-Policy that allows exactly that style and script, by hash)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.resources
import re

_PAGE = ("static", "playground.html")


@dataclasses.dataclass(frozen=True)
class PlaygroundPage:
    """The page's bytes and the headers of every answer that carries them."""

    body: bytes
    headers: tuple[tuple[str, str], ...]


def _inline(html: str, tag: str) -> str:
    """The text of the page's one <tag> element (ValueError unless there is exactly one)."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    if len(found) != 1 or html.count(f"<{tag}") != 1:
        raise ValueError(f"the playground page must hold exactly one plain <{tag}> element")
    return found[0]


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(html: str) -> str:
    """Only the page's own inline style and script; fetch() and images from this origin (results are blob: URLs,
    file thumbnails blob:, data: URI thumbnails data:); no plugins, frames, form posts or base URL changes."""
    return "; ".join((
        "default-src 'none'",
        f"script-src {_sha256_source(_inline(html, 'script'))}",
        f"style-src {_sha256_source(_inline(html, 'style'))}",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'none'",  # without its script the form must not submit the key anywhere
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ))


def load_playground() -> PlaygroundPage:
    """Reads server/static/playground.html (package data) and computes its headers."""
    html = importlib.resources.files("server").joinpath(*_PAGE).read_text(encoding="utf-8")
    headers = (
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Security-Policy", content_security_policy(html)),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cache-Control", "no-cache"),
    )
    return PlaygroundPage(html.encode(), headers)
