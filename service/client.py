"""A small httpx client for a running vae-serve server, with the same verbs as the API.

>>> from service.client import VAEClient
>>> with VAEClient("http://127.0.0.1:8000") as vae:
...     codes = vae.encode("digit.png", sample=True, seed=0)  # JSON: mu, logvar, z per image
...     grid = vae.sample(16, seed=0, format="png")  # bytes of a PNG grid
...     images = VAEClient.to_images(vae.decode([codes["results"][0]["mu"]]))  # PIL images
...     scores = vae.score(["digit.png", "digit.png"], k=500)  # ELBO and log p(x), nats and bits/dim
>>> grid[:4], len(images), len(scores["results"])
(b'\x89PNG', 1, 2)

Images can be a path (str or os.PathLike), PNG/JPEG bytes, a PIL image, a numpy array of pixels (uint8, or floats in
[0, 1]: (H, W) or (H, W, C) for one image, (N, H, W) or (N, H, W, C) for a batch; channels last, as PIL and numpy
store them), or a list of any of these. JSON answers come back as dicts; `format="png"` / `"gif"` answers as bytes.

The `*_array` methods are numpy in, numpy out, over raw tensor bodies and answers (docs/binary-tensors.md): no PNG,
no base64, no JSON numbers on the way, so they suit bulk work. Their images are numpy pixels as above, at the
model's size and channels (uint8 goes as it is; float images are sent in float32); their answers are float32 arrays,
images (N, H, W) or (N, H, W, C), float32 in [0, 1] or uint8:

>>> import numpy as np
>>> with VAEClient("http://127.0.0.1:8000") as vae:  # a one-channel model, such as mnist
...     c, h, w = vae.model_card(vae.models()["default"])["input_shape"]
...     pixels = np.zeros((2, h, w), np.uint8)  # two black images, (N, H, W)
...     posterior = vae.encode_array(pixels)  # float32 "mu" and "logvar", each (2, latent_dim)
...     images = vae.decode_array(posterior["mu"])  # float32 (2, H, W) in [0, 1]; dtype="uint8" for pixels
...     scores = vae.score_array(pixels, k=50)  # float32 (2,) each: "elbo", ..., "log_likelihood", "bits_per_dim"
>>> images.shape == (2, h, w), images.dtype.name, sorted(posterior), scores["log_likelihood"].shape
(True, 'float32', ['logvar', 'mu'], (2,))

Errors raise VAEServiceError with the server's status, code and detail. Imports httpx and (only for PIL or numpy
inputs and outputs and `to_images`) Pillow and numpy; never torch.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import httpx

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

OCTET_STREAM = "application/octet-stream"


class VAEServiceError(Exception):
    """A non-2xx answer: `status` (HTTP), `code` and `detail` (the server's error body)."""

    def __init__(self, status: int, code: str, detail: str, retry_after: str | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after


class VAEClient:
    """Sync client. `model` sets a default model for every call (else the server's default); `http` lets you pass
    a ready httpx.Client (e.g. with another transport)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.model = model
        self._own = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout, headers=headers)
        if http is not None and api_key:
            self.http.headers.update(headers)

    def __enter__(self) -> VAEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.http.close()

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            body = response.json()
            code, detail = str(body.get("code", "http_error")), str(body.get("detail", response.text))
        except ValueError:
            code, detail = "http_error", response.text
        raise VAEServiceError(response.status_code, code, detail, response.headers.get("retry-after"))

    @staticmethod
    def _answer(response: httpx.Response, fmt: str) -> Any:
        return response.content if fmt in ("png", "gif") else response.json()

    def _fields(self, **values: Any) -> dict[str, Any]:
        if values.get("model") is None:
            values["model"] = self.model
        return {k: v for k, v in values.items() if v is not None}

    @staticmethod
    def _read(image: Any) -> bytes:
        """One image -> PNG/JPEG bytes: a path, bytes, a PIL image or a numpy array of one image's pixels."""
        if isinstance(image, bytes | bytearray | memoryview):
            return bytes(image)
        if isinstance(image, str | os.PathLike):
            with open(image, "rb") as f:
                return f.read()
        if _is_array(image):
            image = _array_image(image)
        if not hasattr(image, "save"):
            raise TypeError(
                f"cannot send a {type(image).__name__} as an image: give a path, bytes, a PIL image or a numpy array"
            )
        buf = io.BytesIO()  # a PIL image
        image.save(buf, format="PNG")
        return buf.getvalue()

    @classmethod
    def _images(cls, images: Any) -> list[bytes]:
        """One image or many (see the module's docstring) -> their bytes, in order."""
        if isinstance(images, bytes | bytearray | memoryview | str | os.PathLike) or hasattr(images, "save"):
            return [cls._read(images)]
        if _is_array(images):
            if images.ndim == 4 or (images.ndim == 3 and images.shape[-1] not in (1, 3, 4)):
                return [cls._read(image) for image in images]  # a batch: (N, H, W, C) or (N, H, W)
            return [cls._read(images)]
        return [cls._read(image) for image in images]

    def _upload(self, endpoint: str, images: Any, fmt: str = "json", **fields: Any) -> Any:
        files = [
            ("image", (f"{i}.png", data, "application/octet-stream")) for i, data in enumerate(self._images(images))
        ]
        data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in self._fields(**fields).items()}
        params = {"format": fmt} if fmt != "json" else None
        return self._answer(self._check(self.http.post(endpoint, files=files, data=data, params=params)), fmt)

    def _post_json(self, endpoint: str, body: dict[str, Any], fmt: str = "json") -> Any:
        params = {"format": fmt} if fmt != "json" else None
        return self._answer(self._check(self.http.post(endpoint, json=self._fields(**body), params=params)), fmt)

    def _get(self, endpoint: str, fmt: str = "json", **params: Any) -> Any:
        query = self._fields(**params)
        if fmt != "json":
            query["format"] = fmt
        return self._answer(self._check(self.http.get(endpoint, params=query)), fmt)

    # -- verbs ---------------------------------------------------------------------------------------------------
    def health(self) -> bool:
        return self.http.get("/healthz").is_success

    def ready(self) -> bool:
        return self.http.get("/readyz").is_success

    def models(self) -> dict[str, Any]:
        return dict(self._check(self.http.get("/v1/models")).json())

    def model_card(self, name: str) -> dict[str, Any]:
        return dict(self._check(self.http.get(f"/v1/models/{name}")).json())

    def encode(
        self, images: Any, *, sample: bool = False, seed: int | None = None, model: str | None = None
    ) -> dict[str, Any]:
        """Posterior mean and log-variance per image (and a sample z when `sample`)."""
        return dict(self._upload("/v1/encode", images, sample=sample, seed=seed, model=model))

    def decode(
        self,
        latents: Sequence[Sequence[float]],
        *,
        format: str = "json",
        encoding: str = "png",
        model: str | None = None,
    ) -> Any:
        """Images of latent vectors: JSON (base64 PNGs or pixel arrays) or one PNG grid (format='png')."""
        return self._post_json(
            "/v1/decode", {"latents": [list(z) for z in latents], "encoding": encoding, "model": model}, format
        )

    def sample(
        self,
        n: int = 16,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        format: str = "json",
        encoding: str = "png",
        model: str | None = None,
    ) -> Any:
        """n images from the prior: JSON, or a PNG grid (format='png')."""
        return self._get("/v1/sample", format, n=n, seed=seed, temperature=temperature, encoding=encoding, model=model)

    def reconstruct(
        self,
        images: Any,
        *,
        seed: int = 0,
        binarize: bool | None = None,
        format: str = "json",
        encoding: str = "png",
        model: str | None = None,
    ) -> Any:
        """Reconstructions with each image's ELBO, reconstruction term and KL."""
        return self._upload(
            "/v1/reconstruct", images, format, seed=seed, binarize=binarize, encoding=encoding, model=model
        )

    def score(
        self,
        images: Any,
        *,
        k: int = 100,
        seed: int = 0,
        binarize: bool | None = None,
        fpr: float | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """ELBO and importance-weighted log-likelihood per image (nats and bits/dim), and for calibrated models the
        out-of-distribution score, its p-value and `is_anomaly` at false-positive rate `fpr` (default: the
        server's)."""
        return dict(self._upload("/v1/score", images, k=k, seed=seed, binarize=binarize, fpr=fpr, model=model))

    def interpolate(
        self,
        start: Any,
        end: Any,
        *,
        steps: int = 8,
        path: str = "linear",
        format: str = "json",
        encoding: str = "png",
        model: str | None = None,
    ) -> Any:
        """Frames between two images, or two latent vectors (sequences of floats): JSON, PNG strip or GIF."""
        if _is_latent(start) and _is_latent(end):
            body = {
                "latents": [list(start), list(end)],
                "steps": steps,
                "path": path,
                "encoding": encoding,
                "model": model,
            }
            return self._post_json("/v1/interpolate", body, format)
        return self._upload(
            "/v1/interpolate", [start, end], format, steps=steps, path=path, encoding=encoding, model=model
        )

    def manifold(
        self, steps: int = 15, *, format: str = "json", encoding: str = "png", model: str | None = None
    ) -> Any:
        """The decoded grid over the model's 2-D latent plane."""
        return self._get("/v1/manifold", format, steps=steps, encoding=encoding, model=model)

    # -- numpy in, numpy out: raw tensor bodies and answers (docs/binary-tensors.md) -------------------------------
    def encode_array(
        self, images: Any, *, sample: bool = False, seed: int | None = None, model: str | None = None
    ) -> dict[str, np.ndarray]:
        """Numpy pixels (see the module's docstring) -> float32 "mu" and "logvar" (N, latent_dim), and "z" when
        `sample` (pass `seed` to draw the same z again)."""
        x = _images_tensor(images)
        return _named_columns(self._post_tensor("/v1/encode", x, sample=sample, seed=seed, posterior=True, model=model))

    def decode_array(
        self, latents: Any, *, dtype: Literal["float32", "uint8"] = "float32", model: str | None = None
    ) -> np.ndarray:
        """Latents (N, latent_dim), or one vector -> images (N, H, W) for one channel, else (N, H, W, C): float32 in
        [0, 1] (the decoder's mean, as the JSON `pixels`), or uint8 (the PNGs' pixels)."""
        import numpy as np

        z = np.asarray(latents, dtype=np.float32)
        z = z[None] if z.ndim == 1 else z
        return _images_out(self._post_tensor("/v1/decode", z, model=model, **_image_options(dtype)))

    def reconstruct_array(
        self,
        images: Any,
        *,
        seed: int = 0,
        binarize: bool | None = None,
        dtype: Literal["float32", "uint8"] = "float32",
        model: str | None = None,
    ) -> np.ndarray:
        """Numpy pixels -> their reconstructions, as decode_array's images (the ELBO terms: `reconstruct`)."""
        x = _images_tensor(images)
        options = _image_options(dtype)
        return _images_out(
            self._post_tensor("/v1/reconstruct", x, seed=seed, binarize=binarize, model=model, **options)
        )

    def score_array(
        self,
        images: Any,
        *,
        k: int = 100,
        seed: int = 0,
        binarize: bool | None = None,
        fpr: float | None = None,
        model: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Numpy pixels -> float32 (N,) arrays of `score`'s fields: elbo, recon, kl, elbo_bits_per_dim,
        log_likelihood, bits_per_dim, complexity_bits, and for calibrated models ood_score, p_value and is_anomaly
        (1.0 or 0.0) at false-positive rate `fpr`."""
        x = _images_tensor(images)
        answer = self._post_tensor("/v1/score", x, k=k, seed=seed, binarize=binarize, fpr=fpr, model=model)
        return _named_columns(answer)

    def _post_tensor(self, endpoint: str, array: np.ndarray, **options: Any) -> httpx.Response:
        """POST `array` as a raw tensor body (little-endian, C order; shape and dtype in the query string), asking
        for a tensor answer."""
        params = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in self._fields(**options).items()}
        params |= {"shape": ",".join(str(n) for n in array.shape), "dtype": array.dtype.name}
        headers = {"Content-Type": OCTET_STREAM, "Accept": OCTET_STREAM}
        content = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False).tobytes()
        return self._check(self.http.post(endpoint, content=content, params=params, headers=headers))

    # -- helpers -------------------------------------------------------------------------------------------------
    @staticmethod
    def to_images(answer: dict[str, Any] | bytes) -> list[Image.Image]:
        """The images of a JSON answer (its base64 PNGs), or the one image of a PNG/GIF answer."""
        from PIL import Image

        if isinstance(answer, bytes):
            return [Image.open(io.BytesIO(answer))]
        return [Image.open(io.BytesIO(base64.b64decode(s))) for s in answer.get("images", [])]


def _is_latent(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)


def _is_array(value: Any) -> bool:
    """A numpy array, recognised without importing numpy."""
    return type(value).__module__ == "numpy" and hasattr(value, "ndim") and hasattr(value, "dtype")


def _array_image(pixels: Any) -> Image.Image:
    """One image's pixels, (H, W) or (H, W, C) with C in 1, 3, 4, uint8 or floats in [0, 1] -> a PIL image."""
    import numpy as np
    from PIL import Image

    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W) or (H, W, C) with C in 1, 3, 4 (got shape {a.shape})")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "fiub":
            raise ValueError(f"an image array must hold numbers (got dtype {a.dtype})")
        a = a.astype(np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError("a float image array must hold values in [0, 1] (or send uint8 pixels in 0..255)")
        a = np.rint(a * 255).astype(np.uint8)
    return Image.fromarray(a)


# -- raw tensors (numpy is imported only by the *_array methods) ------------------------------------------------------
_WIRE_DTYPES = {"float32": "<f4", "float16": "<f2", "uint8": "u1"}


def _images_tensor(images: Any) -> np.ndarray:
    """Numpy pixels, channels last ((H, W) or (H, W, C) for one image, (N, H, W) or (N, H, W, C) for a batch),
    uint8 or floats in [0, 1] -> the (N, C, H, W) tensor the server takes: uint8 as it is, floats as float32 in
    [-1, 1] (diffusers' convention, which the server maps back to [0, 1])."""
    import numpy as np

    a = np.asarray(images)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4)):
        a = a[None]  # one image
    if a.ndim == 3:
        a = a[..., None]  # (N, H, W): one channel
    if a.ndim != 4:
        raise ValueError(f"images must be (H, W), (H, W, C), (N, H, W) or (N, H, W, C) pixels (got shape {a.shape})")
    a = a.transpose(0, 3, 1, 2)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"an image array must hold numbers (got dtype {a.dtype})")
    x = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError("a float image array must hold values in [0, 1] (or send uint8 pixels in 0..255)")
    return x * 2 - 1


def _image_options(dtype: str) -> dict[str, Any]:
    """The query options of a tensor answer of images in `dtype`: float32 (N, C, H, W) in [0, 1] (output_type=pil
    with a tensor Accept), or uint8 (N, H, W, C) (partial_postprocess)."""
    if dtype == "float32":
        return {"output_type": "pil"}
    if dtype == "uint8":
        return {"partial_postprocess": True}
    raise ValueError(f"dtype must be 'float32' or 'uint8' (got {dtype!r})")


def _read_tensor(response: httpx.Response) -> np.ndarray:
    """A tensor answer -> a writable array of its shape and dtype."""
    import numpy as np

    dtype = np.dtype(_WIRE_DTYPES[response.headers["dtype"]])
    return np.frombuffer(bytearray(response.content), dtype).reshape(json.loads(response.headers["shape"]))


def _images_out(response: httpx.Response) -> np.ndarray:
    """A tensor answer of images -> (N, H, W) or (N, H, W, C), as the inputs are."""
    a = _read_tensor(response)
    if a.dtype.kind == "f":  # (N, C, H, W) in [0, 1]
        a = a.transpose(0, 2, 3, 1)
        a = a[..., 0] if a.shape[-1] == 1 else a
    return a.copy() if not a.flags.c_contiguous else a


def _named_columns(response: httpx.Response) -> dict[str, np.ndarray]:
    """A tensor answer whose second axis is named by its `fields` header -> one array per name."""
    a = _read_tensor(response)
    return {name: a[:, i].copy() for i, name in enumerate(json.loads(response.headers["fields"]))}
