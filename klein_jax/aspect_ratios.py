"""The eight API aspect ratios (shared/spec/api.md): name -> (width, height) in pixels.

Data only: klein_jax/request.py checks names against it (`resolve_aspect_ratio`).
"""

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
