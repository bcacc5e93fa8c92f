"""Bytes <-> images: guarded decoding of uploads and encoding of PNG / GIF responses. No HTTP, no model."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libspng's Python binding: ~6x faster than Pillow on a small PNG; not built for every platform
    import pyspng
except ImportError:  # pragma: no cover - the Pillow path below serves every image either way
    pyspng = None

from service.errors import ImageTooLarge, InvalidPayload, limit_hint

FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {1: 0, 3: 2}  # channels -> the PNG colour type that holds exactly them: grey, truecolour
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
        raise ImageTooLarge(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            f"{limit_hint('max_image_pixels')}"
        )
    return image


def ready_png(data: bytes, input_shape: tuple[int, int, int]) -> np.ndarray | None:
    """The pixels of a valid 8-bit grey or RGB PNG already at the model's size and channels, as uint8 (H, W, C),
    decoded by libspng; None for anything else (any other image, a bad checksum, no pyspng), which then takes the
    Pillow path with its checks and error messages. The pixels are the ones Pillow gives: PNG is lossless, and
    neither applies gamma or transparency to grey or RGB data.

    This is the hot path of single-image encode requests (docs/benchmarks.md)."""
    c, h, w = input_shape
    if pyspng is None or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    if (int.from_bytes(data[16:20]), int.from_bytes(data[20:24])) != (w, h) or data[24] != 8:
        return None  # the size check also bounds the decode: no bomb gets past it
    if data[25] != _PNG_COLOR_TYPES.get(c):
        return None
    # libspng, as pyspng calls it, does not verify chunk checksums: a corrupt upload would decode to garbage
    # instead of a 400. Verified here (zlib's crc32, a few microseconds), and anything amiss goes to Pillow.
    pos, end_of_data = 8, len(data)
    while pos + 12 <= end_of_data:
        length = int.from_bytes(data[pos : pos + 4])
        end = pos + 8 + length
        if end + 4 > end_of_data or zlib.crc32(data[pos + 4 : end]) != int.from_bytes(data[end : end + 4]):
            return None
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos = end + 4
    else:
        return None
    try:
        pixels = pyspng.load(data)
    except RuntimeError:
        return None
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape[:2] != (h, w):
        return None
    return pixels.reshape(h, w, c)


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
    """An image as a PNG: 8-bit grey and RGB by png_pixels, other modes by Pillow."""
    if image.mode in ("L", "RGB"):
        return png_pixels(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_pixels(pixels: np.ndarray) -> bytes:
    """uint8 pixels, (H, W) grey or (H, W, 3) RGB, as a PNG written here: zlib at level 1 over the rows, each
    unfiltered (the format's filter type 0). Pillow's writer spends more on each save's set-up than on a small image:
    a 28x28 digit took 19-55 us there against 14-25 here, a 482x482 grid of 256 digits 3.9 against 2.2 ms (Pillow's
    file 3 % smaller; docs/benchmarks.md, section 0000000). Answers' pixels come here without a PIL image between."""
    height, width = pixels.shape[:2]
    color_type = _PNG_COLOR_TYPES[1 if pixels.ndim == 2 else pixels.shape[2]]
    rows = np.zeros((height, 1 + pixels[0].size), np.uint8)  # each row: its filter type (0), then its bytes
    rows[:, 1:] = pixels.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)  # 8 bits, deflate, no interlace
    return b"".join(
        (PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", zlib.compress(rows.data, 1)), _IEND)
    )


def _png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


_IEND = _png_chunk(b"IEND")


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_base64(pixels: np.ndarray) -> str:
    """png_pixels, in base64."""
    return base64.b64encode(png_pixels(pixels)).decode("ascii")


def gif_bytes(frames: Sequence[Image.Image], frame_ms: int) -> bytes:
    """An animated GIF that loops forever."""
    buf = io.BytesIO()
    first, *rest = frames
    first.save(buf, format="GIF", save_all=True, append_images=rest, duration=frame_ms, loop=0, optimize=False)
    return buf.getvalue()
