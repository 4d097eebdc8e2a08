"""Decoding reference images from untrusted bytes: real formats only, bounded pixels, EXIF orientation, RGB."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import RequestError

# Pillow's format ids. JPEG includes phone JPEGs that Pillow opens as MPO.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Pillow's plugins raise many types on malformed input (OSError, SyntaxError, struct.error, zlib.error, IndexError...);
# the guarded regions below call only Pillow on the untrusted bytes, so any exception there means a bad image.
_DECODE_ERRORS = (Exception,)


def decode_image(data: bytes, *, max_pixels: int, label: str) -> Image.Image:
    """An RGB PIL image from encoded bytes; RequestError 422 naming `label` if it is not a bounded, valid image."""
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise RequestError(422, f"{label} is not a {', '.join(SUPPORTED_FORMATS)} image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(422, f"{label} is a decompression bomb ({_reason(e)}); at most {max_pixels} "
                                "pixels") from None
    except _DECODE_ERRORS as e:
        raise RequestError(422, f"{label} could not be decoded: {_reason(e)}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:  # checked before any pixel is decoded
            raise RequestError(422, f"{label} is {width}x{height} = {width * height} pixels; at most {max_pixels}")
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise RequestError(422, f"{label} is a decompression bomb ({_reason(e)}); at most {max_pixels} "
                                    "pixels") from None
        except _DECODE_ERRORS as e:
            raise RequestError(422, f"{label} could not be decoded: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    """A short, single-line reason (Pillow messages can be long or empty)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]
