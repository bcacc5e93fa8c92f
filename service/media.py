"""Bytes <-> images: guarded decoding of uploads and encoding of PNG / GIF responses. No HTTP, no model."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidPayload

FORMATS = ("PNG", "JPEG")
_DATA_URL_PREFIX = "data:"


def open_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """PNG or JPEG bytes -> a PIL image whose header has been read and checked; no pixel is decoded yet.

    Raises InvalidPayload (empty, not a PNG/JPEG) or ImageTooLarge (more than `max_pixels` pixels: the
    decompression-bomb guard, before any decoding)."""
    if not data:
        raise InvalidPayload(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb guard warns above ~89 Mpx and raises above ~179 Mpx; ours is stricter and fires first.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"{what} is too large to decode: {e}") from None
    except UnidentifiedImageError:
        raise InvalidPayload(f"{what} is not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidPayload(f"{what} cannot be read: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return image


def load_image(image: Image.Image, what: str = "image") -> Image.Image:
    """Decode the pixels of an opened image; raises InvalidPayload when the data is truncated or corrupt."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidPayload(f"{what} cannot be decoded (truncated or corrupt?): {e}") from None
    return image


def b64decode(text: str, what: str = "image") -> bytes:
    """Standard base64 (a `data:<type>;base64,` prefix is allowed) -> bytes; raises InvalidPayload."""
    if text.startswith(_DATA_URL_PREFIX):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidPayload(f"{what} is not valid base64") from None


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def gif_bytes(frames: Sequence[Image.Image], frame_ms: int) -> bytes:
    """An animated GIF that loops forever."""
    buf = io.BytesIO()
    first, *rest = frames
    first.save(buf, format="GIF", save_all=True, append_images=rest, duration=frame_ms, loop=0, optimize=False)
    return buf.getvalue()
