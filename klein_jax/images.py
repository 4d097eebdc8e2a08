"""Host-side image handling of Flux2KleinPipeline: reference preprocessing and output postprocessing.

Ports diffusers Flux2ImageProcessor (check_image_input, _resize_to_target_area, _resize_and_crop) and the parts of
VaeImageProcessor the pipeline uses on the host (convert_to_rgb, pil_to_numpy, normalize, numpy_to_pil; denormalize
runs in the compiled program, klein_jax/sampler.py). Resizing stays in PIL (LANCZOS): jax.image.resize is not
bit-identical to it (klein.md §8.15).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import PIL.Image

from klein_jax.request import check_reference_count

MAX_REFERENCE_AREA = 1024 * 1024  # Flux2KleinPipeline resizes larger references down to this many pixels
MIN_SIDE = 64  # Flux2ImageProcessor.check_image_input
MAX_ASPECT_RATIO = 8
MULTIPLE_OF = 16  # vae_scale_factor (8) x 2x2 patch


def check_image_input(image, *, index: int = 0) -> PIL.Image.Image:
    """The image if it is a PIL image with both sides >= 64 px and aspect ratio <= 8 (Flux2ImageProcessor)."""
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"reference image {index} must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(
            f"reference image {index} is too small: {width}x{height}; both sides must be at least {MIN_SIDE} px"
        )
    ratio = max(width / height, height / width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"reference image {index} aspect ratio is too extreme: {width}x{height} ({ratio:.1f}:1); "
            f"at most {MAX_ASPECT_RATIO}:1 is allowed"
        )
    return image


def resize_to_target_area(image: PIL.Image.Image, target_area: int = MAX_REFERENCE_AREA) -> PIL.Image.Image:
    """Scale to about `target_area` pixels keeping the aspect ratio: int() truncation, LANCZOS (diffusers)."""
    width, height = image.size
    scale = math.sqrt(target_area / (width * height))
    return image.resize((int(width * scale), int(height * scale)), PIL.Image.Resampling.LANCZOS)


def center_crop(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """Crop the centre `width` x `height` box (Flux2ImageProcessor._resize_and_crop: a pure crop)."""
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _to_rgb(image: PIL.Image.Image, index: int) -> PIL.Image.Image:
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:  # unsupported mode (e.g. "La"), or a truncated / unreadable file
        raise ValueError(f"reference image {index} (mode {image.mode!r}) cannot be converted to RGB: {e}") from None


def preprocess_reference(image, *, index: int = 0, multiple_of: int = MULTIPLE_OF) -> np.ndarray:
    """A reference image as Flux2KleinPipeline feeds it to the VAE: float32 (h, w, 3) in [-1, 1], h, w % 16 == 0.

    multiple_of: pixels per transformer token, 2 x the VAE's downsampling (16 for every klein checkpoint).
    """
    image = check_image_input(image, index=index)
    if image.width * image.height > MAX_REFERENCE_AREA:
        image = resize_to_target_area(image)
    width = (image.width // multiple_of) * multiple_of
    height = (image.height // multiple_of) * multiple_of
    image = _to_rgb(center_crop(image, width, height), index)  # diffusers: crop, then convert_to_rgb
    pixels = np.asarray(image).astype(np.float32) / 255.0  # VaeImageProcessor.pil_to_numpy
    return 2.0 * pixels - 1.0  # VaeImageProcessor.normalize: [0, 1] -> [-1, 1]


def preprocess_references(images: Sequence, multiple_of: int = MULTIPLE_OF) -> list[np.ndarray]:
    """Check then preprocess 0..MAX_REFERENCES references, in order (check_image_input runs on all of them first)."""
    images = list(images or ())
    check_reference_count(len(images))
    for k, image in enumerate(images):
        check_image_input(image, index=k)
    return [preprocess_reference(image, index=k, multiple_of=multiple_of) for k, image in enumerate(images)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 with round-half-even, as diffusers' numpy_to_pil: (x * 255).round()."""
    return (np.asarray(images, np.float32) * 255).round().astype(np.uint8)


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, 3) or (H, W, 3) float32 in [0, 1] -> RGB PIL images (VaeImageProcessor.numpy_to_pil)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    return [PIL.Image.fromarray(image) for image in to_uint8(images)]
