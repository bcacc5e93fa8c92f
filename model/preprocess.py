"""Image <-> tensor conversion shared by the folder dataset reader and the service, so serving sees images
exactly the way training did. Pure PIL + torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

MODES = {1: "L", 3: "RGB"}


def color_mode(channels: int) -> str:
    if channels not in MODES:
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    return MODES[channels]


def input_spec(input_shape: tuple[int, int, int], binarized: bool) -> dict[str, Any]:
    """The card's description of what the model expects, written by training and read by the service."""
    c, h, w = input_shape
    return {
        "shape": [c, h, w],
        "channels": c,
        "height": h,
        "width": w,
        "color_mode": color_mode(c),
        "value_range": [0.0, 1.0],
        "dtype": "float32",
        "preprocessing": f"convert to {color_mode(c)}, resize to {w}x{h} (bilinear) if needed, divide by 255",
        "binarized": "dynamic Bernoulli binarisation in training; fixed-seed binarisation for test figures"
        if binarized
        else "none (continuous values)",
    }


def pil_to_tensor(image: Image.Image, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Any PIL image -> float tensor (C, H, W) in [0, 1] at the model's channels and size."""
    c, h, w = input_shape
    mode = color_mode(c)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto black, the background of the training digits.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grey (PNG): PIL's convert("L") clips at 255 instead of scaling, so scale 0..65535 to 0..255 here,
        # to the nearest level: round(v / 257) == (2v + 257) // 514. In place, in 32-bit integers: a 4096x4096
        # image needs ~100 MB on top of its own, where float64 and its temporaries took ~400 MB.
        wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        wide *= 2
        wide += 257
        wide //= 514
        image = Image.fromarray(wide.astype(np.uint8))
    image = image.convert(mode)
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


# float32(v) / 255 for each byte value v, by the very division pil_to_tensor does: looking values up here gives
# the same floats, bit for bit, for a whole batch at once instead of a chain of tensor ops per image.
_UNIT_FLOATS = torch.arange(256, dtype=torch.float32).div_(255.0).numpy()


def ready_pixels(image: Image.Image, input_shape: tuple[int, int, int]) -> np.ndarray | None:
    """The pixels of a loaded image that is already at the model's channels and size, as uint8 (H, W, C), else None.

    For such an image pil_to_tensor has nothing to convert: its result is unit_floats of these bytes."""
    c, h, w = input_shape
    if image.mode != MODES.get(c) or image.size != (w, h):
        return None
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(h, w, c)


def unit_floats(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1], exactly as pil_to_tensor scales each image."""
    # Reordered in numpy: on a server's event loop, every tensor op releases and retakes the GIL, a chance for the
    # model's worker thread to take it in between.
    return torch.from_numpy(np.ascontiguousarray(_UNIT_FLOATS[pixels].transpose(0, 3, 1, 2)))


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic binarisation: each pixel is 1 with probability equal to its intensity (Salakhutdinov & Murray).
    Bernoulli models are trained on it (a fresh sample each time) and evaluated on it (a fixed seed)."""
    return torch.bernoulli(x, generator=generator)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] (any shape, e.g. a batch) -> uint8 pixels 0..255, to the nearest level: what PNGs hold."""
    return (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor (C, H, W) in [0, 1] -> PIL image (L or RGB)."""
    arr = to_uint8(x).cpu()
    c = arr.shape[0]
    if c == 1:
        return Image.fromarray(arr[0].numpy())  # uint8 2-D -> "L"
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())  # uint8 (H, W, 3) -> "RGB"


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) -> one (C, H', W') tensor tiling the images row by row (like torchvision.utils.make_grid)."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    ncol = int(np.ceil(n / nrow))
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i].detach().float().cpu()
    return grid
