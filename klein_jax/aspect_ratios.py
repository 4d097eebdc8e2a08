"""The eight API aspect ratios (shared/spec/api.md): name -> (width, height) in pixels."""

from __future__ import annotations

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "square": (1024, 1024),
    "landscape": (1344, 768),
    "portrait": (768, 1344),
    "photo": (1248, 832),
    "photo_v": (832, 1248),
    "standard": (1184, 896),
    "standard_v": (896, 1184),
    "wide": (1568, 672),
}
DEFAULT_ASPECT_RATIO = "landscape"


def resolve_aspect_ratio(name: str) -> tuple[int, int]:
    """(width, height) for an API aspect-ratio name; ValueError listing the valid names otherwise."""
    try:
        return ASPECT_RATIOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"aspect_ratio {name!r} is not one of {', '.join(ASPECT_RATIOS)}") from None
