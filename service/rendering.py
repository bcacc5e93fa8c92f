"""Response rendering: an Answer (schemas.Answer) in the negotiated format -> the HTTP response. The one place for
JSON, PNG, JPEG, GIF and raw tensor bodies.

JSON is written by orjson: the predictor's float32 outputs go in as numpy arrays and come out as the shortest
decimal that reads back as the same float32 (never float64's 17 digits, 8 of them noise); Python floats as the
shortest decimal of the float64; NaN and infinities as null. For a 256-image encode answer: 1.9 against 6.1 us per
image, and 311 against 536 kB (docs/benchmarks.md).

A tensor answer is Hugging Face's remote-VAE convention (docs/binary-tensors.md): the array's bytes (little-endian,
C order) with `shape` (a JSON list) and `dtype` headers. Images go out as diffusers' VAEs give them: float32
(N, C, H, W) in [-1, 1]; with `partial_postprocess`, uint8 (N, H, W, C) as in the PNGs ((N, H, W) for one channel);
with output_type=pil, float32 (N, C, H, W) in [0, 1]. Latents are scaled as the request asks.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from model import preprocess
from service import media
from service.schemas import Answer, Format, ImageTensorQuery, TensorQuery

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
# Images up to this many pixels are encoded on the event loop (tens of microseconds); larger ones in a thread.
INLINE_PIXELS = 256 * 256
NOTES_HEADER = "X-Input-Converted"
# numpy's dtype.__str__ runs Python code: a tensor answer's `dtype` header is looked up instead
DTYPE_NAMES = {np.dtype(name): name for name in ("float32", "uint8")}


async def render(answer: Answer, fmt: Format, gif_frame_ms: int = 100, options: TensorQuery | None = None) -> Response:
    """The Answer as JSON, a PNG or JPEG (one image, or a grid), an animated GIF, or a raw tensor made as a raw
    body's `options` ask."""
    if fmt == "json":
        response = json_response(answer)
    elif fmt == "tensor":
        response = tensor_response(answer, options)
    elif fmt in ("png", "jpeg"):
        assert answer.images is not None, "an image answer needs images"
        response = await image_response(grid(answer.images, answer.nrow, answer.padding), fmt)
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
    return {"images": [media.png_base64(pixels) for pixels in image_pixels(images)]}


def pixels_of(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> uint8 (N, H, W, C), quantised exactly as model.preprocess.to_uint8 does it
    (clamped, times 255 in float32, rounded half to even), in numpy: on the event loop each torch op costs several
    times a numpy one, and gives the GIL to the forward thread."""
    quantised = np.clip(images.numpy(), 0.0, 1.0)  # float32, a copy
    quantised *= np.float32(255.0)
    pixels: np.ndarray = np.rint(quantised).astype(np.uint8).transpose(0, 2, 3, 1)
    return pixels


def image_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> the images' uint8 pixels as PNGs hold them: (N, H, W) for one channel, else
    (N, H, W, C); C-contiguous either way. What every image answer (PNG, PIL image, uint8 tensor) is made of."""
    pixels = pixels_of(images)
    return np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [0, 1] -> N images, L (one channel) or RGB."""
    return [Image.fromarray(p) for p in image_pixels(images)]


def grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """(N, C, H, W) -> one image, row by row (`nrow` per row; default: a square) on white padding, as
    model.preprocess.make_grid lays it out. One image comes back as itself, unframed."""
    if len(images) == 1:
        return to_pil(images)[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    return to_pil(preprocess.make_grid(images, nrow=nrow, padding=padding)[None])[0]


async def image_response(image: Image.Image, fmt: str = "png") -> Response:
    """One PNG or JPEG; large ones are compressed in a thread so the event loop keeps serving."""
    encode = media.png_bytes if fmt == "png" else media.jpeg_bytes
    if image.width * image.height <= INLINE_PIXELS:
        data = encode(image)
    else:
        data = await run_in_threadpool(encode, image)
    return Response(data, media_type=f"image/{fmt}")


def tensor_response(answer: Answer, options: TensorQuery | None) -> Response:
    """The answer's images, or its one array, as raw bytes with `shape` and `dtype` headers (and `seed` and
    `fields` where the answer has them)."""
    if answer.images is not None:
        array = image_array(answer.images, options)
    else:
        assert answer.tensor is not None, "a tensor answer needs images or a tensor"
        array = answer.tensor
        scaling, shift = getattr(options, "scaling_factor", None), getattr(options, "shift_factor", None)
        if scaling is not None or shift is not None:  # diffusers' latent scaling: (z - shift) * scaling
            array = (array - np.float32(shift or 0.0)) * np.float32(1.0 if scaling is None else scaling)
    headers = {"shape": json.dumps(list(array.shape)), "dtype": DTYPE_NAMES.get(array.dtype) or str(array.dtype)}
    if answer.fields.get("seed") is not None:
        headers["seed"] = str(answer.fields["seed"])
    if answer.tensor_fields:
        headers["fields"] = json.dumps(answer.tensor_fields)
    return Response(np.ascontiguousarray(array).tobytes(), media_type=OCTET_STREAM, headers=headers)


def image_array(images: torch.Tensor, options: TensorQuery | None) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> the array of a tensor answer (see the module's docstring)."""
    query = options if isinstance(options, ImageTensorQuery) else None
    if query is not None and query.output_type == "pil":
        return images.numpy()
    if query is not None and query.partial_postprocess:
        return image_pixels(images)  # the PNGs' pixels: the same bytes
    return (images * 2.0 - 1.0).numpy()
