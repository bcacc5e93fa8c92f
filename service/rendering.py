"""Response rendering: an Answer (schemas.Answer) in the negotiated format -> the HTTP response. The one place for
JSON, PNG and GIF bodies.

JSON is written by orjson: the predictor's float32 outputs go in as numpy arrays and come out as the shortest
decimal that reads back as the same float32 (never float64's 17 digits, 8 of them noise); Python floats as the
shortest decimal of the float64; NaN and infinities as null. For a 256-image encode answer: 1.9 against 6.1 us per
image, and 311 against 536 kB (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import torch
from fastapi import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from model import preprocess
from service import media
from service.schemas import Answer, Format

JSON = "application/json"
# Images up to this many pixels are encoded on the event loop (tens of microseconds); larger ones in a thread.
INLINE_PIXELS = 256 * 256
NOTES_HEADER = "X-Input-Converted"


async def render(answer: Answer, fmt: Format, gif_frame_ms: int = 100) -> Response:
    """The Answer as JSON, a PNG (one image, or a grid), or an animated GIF."""
    if fmt == "json":
        response = json_response(answer)
    elif fmt == "png":
        assert answer.images is not None, "a PNG answer needs images"
        response = await png_response(grid(answer.images, answer.nrow, answer.padding))
    else:
        assert answer.images is not None, "a GIF answer needs images"
        frames = to_pil(answer.images)
        response = Response(await run_in_threadpool(media.gif_bytes, frames, gif_frame_ms), media_type="image/gif")
    if answer.notes:
        response.headers[NOTES_HEADER] = "; ".join(answer.notes)
    return response


def json_response(answer: Answer) -> Response:
    fields = {k: v for k, v in answer.fields.items() if v is not None}
    if answer.images is not None:
        fields.update(image_fields(answer.images, answer.encoding))
    return Response(orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)


def image_fields(images: torch.Tensor, encoding: str) -> dict[str, Any]:
    """The `images` (base64 PNGs) or `pixels` field of a JSON answer."""
    if encoding == "pixels":
        return {"pixels": images.tolist()}
    return {"images": [media.png_base64(img) for img in to_pil(images)]}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [preprocess.tensor_to_pil(img) for img in images]


def grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """(N, C, H, W) -> one image, row by row (`nrow` per row; default: a square). One image comes back as itself,
    unframed."""
    if len(images) == 1:
        return preprocess.tensor_to_pil(images[0])
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    return preprocess.tensor_to_pil(preprocess.make_grid(images, nrow=nrow, padding=padding))


async def png_response(image: Image.Image) -> Response:
    """One PNG; large ones are compressed in a thread so the event loop keeps serving."""
    if image.width * image.height <= INLINE_PIXELS:
        data = media.png_bytes(image)
    else:
        data = await run_in_threadpool(media.png_bytes, image)
    return Response(data, media_type="image/png")
