"""Decoding reference images from untrusted bytes: real formats only, bounded pixels (per image, and across requests
through PixelBudget), EXIF orientation applied; and PNG encoding of the generated images (PngEncoder).

A decoded image keeps its own mode: klein_jax.images converts to RGB after resizing, as diffusers does (an RGBA
image over 1 MP is resized with its alpha, a palette image with NEAREST, and only then converted). Only 16-bit
greyscale is reduced to 8 bits here, since converting it to RGB would clip every tone above 255 to white.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import RequestError

# Pillow's format ids. JPEG includes phone JPEGs that Pillow opens as MPO.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Pillow's plugins raise many types on malformed input (OSError, SyntaxError, struct.error, zlib.error, IndexError...);
# the guarded regions below call only Pillow on the untrusted bytes, so any exception there means a bad image.
_DECODE_ERRORS = (Exception,)
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def image_pixels(data: bytes, *, max_pixels: int, label: str) -> int:
    """width x height from the header alone; RequestError 422 if it is not a supported image within max_pixels."""
    with _open(data, max_pixels, label) as image:
        return image.width * image.height


def decode_image(data: bytes, *, max_pixels: int, label: str) -> Image.Image:
    """A decoded, upright PIL image in its own mode (16-bit grey as 8-bit L); RequestError 422 naming `label` if it
    is not a bounded, valid image."""
    with _open(data, max_pixels, label) as image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _eight_bit(upright) if upright.mode in _SIXTEEN_BIT_GREY else upright
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb(label, e, max_pixels) from None
        except _DECODE_ERRORS as e:
            raise RequestError(422, f"{label} could not be decoded: {_reason(e)}") from None


def _open(data: bytes, max_pixels: int, label: str) -> Image.Image:
    """The image with only its header read, its pixel count checked against max_pixels."""
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise RequestError(422, f"{label} is not a {', '.join(SUPPORTED_FORMATS)} image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(label, e, max_pixels) from None
    except _DECODE_ERRORS as e:
        raise RequestError(422, f"{label} could not be decoded: {_reason(e)}") from None
    width, height = image.size
    if width * height > max_pixels:  # checked before any pixel is decoded
        image.close()
        raise RequestError(422, f"{label} is {width}x{height} = {width * height} pixels; at most {max_pixels}")
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale as 8-bit L, keeping the high byte (what Pillow does with 16-bit RGB PNGs)."""
    values = np.asarray(image).astype(np.uint32)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")


def _bomb(label: str, error: Exception, max_pixels: int) -> RequestError:
    return RequestError(422, f"{label} is a decompression bomb ({_reason(error)}); at most {max_pixels} pixels")


def _reason(error: Exception) -> str:
    """A short, single-line reason (Pillow messages can be long or empty)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


class PixelBudget:
    """The decoded reference pixels all requests may hold at once; acquire() waits, first come first served.

    Used on the event loop only. A request takes the pixels of all its references in one acquire (so two requests
    can never each hold half of what they need), and gives them back when its decoded images are dropped.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, pixels: int) -> int:
        """Waits until `pixels` (at most the whole budget) are free and takes them; returns the amount taken."""
        pixels = min(pixels, self.limit)
        if not self._waiters and self.used + pixels <= self.limit:
            self.used += pixels
            return pixels
        waiter = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:  # cancelled or timed out: give back what may have been granted meanwhile
            if waiter.done() and not waiter.cancelled():
                self.release(pixels)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        return pixels

    def release(self, pixels: int) -> None:
        """Gives back what acquire() returned."""
        self.used -= pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            pixels, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += pixels
                waiter.set_result(None)


def encode_png(image: Image.Image, compress_level: int) -> bytes:
    """The PNG bytes of a generated image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


class PngEncoder:
    """PNG encoding on threads of its own: a batch's images encode in parallel (Pillow releases the GIL while zlib
    compresses), beside the device's next batch, and never queue behind reference decoding in the default pool."""

    def __init__(self, compress_level: int, threads: int):
        self.compress_level = compress_level
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="klein-png")

    async def encode(self, image: Image.Image) -> bytes:
        """encode_png on one of the pool's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, encode_png, image, self.compress_level)

    def close(self) -> None:
        """Stops the threads once the encodings under way end."""
        self._pool.shutdown(wait=False, cancel_futures=True)
