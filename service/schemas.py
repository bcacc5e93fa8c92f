"""Request and response bodies, one pair per endpoint, plus ModelInfo and the error body; and the two plain objects
that carry a request through the service (Call: what the client asked, Answer: what the model says)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1, description="seed of this request's own torch.Generator")]
Latent = list[FiniteFloat]
# A pixel array in [0, 1]: (C, H, W), (H, W) for one-channel models, or flat C*H*W (checked against the model).
PixelArray = list[Any]
if TYPE_CHECKING:
    import numpy as np
    import torch

Encoding = Literal["png", "pixels"]
# "tensor": raw bytes with `shape` and `dtype` headers (Accept: application/octet-stream or tensor/binary).
Format = Literal["json", "png", "gif", "jpeg", "tensor"]
# The element types of a raw tensor body (Hugging Face's remote-VAE convention), little-endian.
TensorDtype = Literal["float16", "float32", "bfloat16", "uint8"]
TENSOR_DTYPES: tuple[str, ...] = get_args(TensorDtype)

_IMAGES = "base64-encoded PNG or JPEG files (any size and mode; converted as in training)"
_PIXELS = "pixel arrays in [0, 1] at the model's exact shape: (C, H, W), (H, W) for one channel, or flat"
_ENCODING_SHORT = "images as base64 PNGs, or as pixel arrays in [0, 1]"
_ENCODING = "how JSON responses carry images: base64 PNGs in `images`, or arrays in [0, 1] in `pixels`"
# A 4x4 grey square as a PNG, so the schema's examples run against any model.
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAAAAACMmsGiAAAAEElEQVR4nGNsYGBgYGJAIQAJ5ACIUhZOXwAAAABJRU5ErkJggg=="


class ErrorResponse(BaseModel):
    """Every error has this body."""

    detail: str = Field(description="what went wrong, for humans")
    code: str = Field(description="what went wrong, for programs (see docs/api.md)")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": "unknown model 'x'; served: mnist", "code": "model_not_found"}]}
    )


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="served model name, or NAME@VERSION for one version; default: the server's default model"
    )


class _ImagesIn(_Request):
    images: list[str] | None = Field(None, description=_IMAGES)
    pixels: list[PixelArray] | None = Field(None, description=_PIXELS)


# -- query parameters ----------------------------------------------------------------------------------------------
# Query models forbid unknown names, so `?modle=` or a body field sent as `?k=` is a 422 naming it, never ignored.
_MODEL = (
    "served model name, or NAME@VERSION for one version (default: the server's default model, and a model's default "
    "version); also accepted as the body's `model` field"
)
_FORMAT = "response format; overrides the Accept header (default: JSON)"


class ModelQuery(BaseModel):
    """The query string of POST endpoints answering JSON only."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description=_MODEL, examples=["mnist"])


class ModelFormatQuery(ModelQuery):
    """The query string of POST endpoints that can answer in more than one format."""

    format: Format | None = Field(None, description=_FORMAT)


ImagesOut = Annotated[list[str] | None, Field(description="base64 PNGs (encoding=png)")]
Version = Annotated[str, Field(description="the model version that computed this answer (also in X-Model-Version)")]
PixelsOut = Annotated[list[list[list[list[float]]]] | None, Field(description="(C, H, W) arrays (encoding=pixels)")]


# -- models -------------------------------------------------------------------------------------------------------
class VersionInfo(BaseModel):
    """One version of a model, with its card."""

    version: str
    default: bool = Field(description="whether requests naming the model without a version get this one")
    kind: str
    likelihood: str
    latent_dim: int
    input_shape: list[int]
    metrics: dict[str, Any]
    weights: dict[str, Any] = Field(description="weights file, sha256 and size")
    created: str | None = None
    card: dict[str, Any] = Field(description="the full model card")


class ModelInfo(BaseModel):
    name: str
    version: str = Field("1", description="the version this card describes: the model's default, or the one named")
    default: bool
    description: str | None = None
    kind: str = Field(description="vae, or ae (plain autoencoder: no prior, no likelihood)")
    likelihood: str = Field(description="bernoulli or gaussian decoder")
    latent_dim: int
    input_shape: list[int] = Field(description="(C, H, W) the model takes")
    input: dict[str, Any] = Field(description="the card's input spec: channels, size, value range, preprocessing")
    architecture: dict[str, Any] = Field(description="the VAEConfig the weights were trained with")
    metrics: dict[str, Any] = Field(description="test ELBO, NLL (nats, bits/dim), active units, ...")
    weights: dict[str, Any] = Field(description="weights file, sha256 and size")
    dataset: dict[str, Any]
    created: str | None = None
    device: str
    dtype: str
    calibrated: bool = Field(description="whether /v1/score gives a calibrated OOD score (docs/anomaly.md)")
    calibration: dict[str, Any] | None = Field(description="how the OOD score was calibrated, when it was")
    card: dict[str, Any] = Field(description="the full model card")
    versions: list[VersionInfo] = Field(default_factory=list, description="every version serving, oldest first")
    load_error: str | None = Field(
        None, description="why the last load or reload failed (the versions listed still serve); null after a success"
    )


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class LifecycleResponse(BaseModel):
    """What a reload, load or unload did (POST /v1/models/{name}/reload, /load, /unload)."""

    model: str
    default_version: str | None = Field(description="the version requests naming none get now; null once unloaded")
    versions: list[str] = Field(description="the versions serving now, oldest first")
    loaded: list[str] = Field(description="versions this call loaded, validated and warmed before they served")
    unloaded: list[str] = Field(description="versions this call retired: their requests finished, then they stopped")
    seconds: float = Field(description="how long the change took, draining included")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist",
                    "default_version": "2",
                    "versions": ["1", "2"],
                    "loaded": ["2"],
                    "unloaded": [],
                    "seconds": 0.31,
                }
            ]
        }
    )


# -- encode -------------------------------------------------------------------------------------------------------
class EncodeRequest(_ImagesIn):
    """JSON form of /v1/encode (multipart: repeated `image` files plus these fields as form fields)."""

    sample: bool = Field(False, description="also return z = mu + sigma * eps drawn from q(z|x)")
    seed: Seed | None = Field(None, description="seed for z (default: a fresh one, returned in the response)")

    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [EXAMPLE_PNG], "sample": True, "seed": 0}]})


class Posterior(BaseModel):
    mu: list[float] = Field(description="posterior mean")
    logvar: list[float] = Field(description="posterior log-variance")
    z: list[float] | None = Field(None, description="a sample from q(z|x) (when sample=true)")


class EncodeResponse(BaseModel):
    model: str
    version: Version
    latent_dim: int
    seed: int | None = Field(None, description="the seed z was drawn with (when sample=true)")
    results: list[Posterior]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist-2d",
                    "version": "1",
                    "latent_dim": 2,
                    "seed": 0,
                    "results": [{"mu": [0.41, -1.2], "logvar": [-4.1, -3.9], "z": [0.5, -1.31]}],
                }
            ]
        }
    )


# -- decode -------------------------------------------------------------------------------------------------------
class DecodeRequest(_Request):
    latents: list[Latent] = Field(min_length=1, description="latent vectors, each of the model's latent_dim")
    encoding: Encoding = Field("png", description=_ENCODING)

    model_config = ConfigDict(json_schema_extra={"examples": [{"latents": [[0.0, 0.0], [1.0, -0.5]]}]})


class DecodeResponse(BaseModel):
    model: str
    version: Version
    images: ImagesOut = None
    pixels: PixelsOut = None

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "mnist", "version": "1", "images": [EXAMPLE_PNG]}]}
    )


# -- sample -------------------------------------------------------------------------------------------------------
class SampleRequest(ModelFormatQuery):
    """GET /v1/sample's query string."""

    n: int = Field(16, ge=1, description="images to draw (capped by max_sample_n)", examples=[16])
    seed: Seed | None = Field(None, description="same seed, same images (default: a fresh one)", examples=[0])
    temperature: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="scales the prior's standard deviation", examples=[0.8]
    )
    encoding: Encoding = Field("png", description="JSON only: " + _ENCODING_SHORT)


class SampleResponse(BaseModel):
    model: str
    version: Version
    seed: int
    temperature: float
    latents: list[list[float]] = Field(description="the prior draws z (already scaled by the temperature)")
    images: ImagesOut = None
    pixels: PixelsOut = None


# -- reconstruct ----------------------------------------------------------------------------------------------------
class ReconstructRequest(_ImagesIn):
    """JSON form of /v1/reconstruct (multipart: repeated `image` files plus these fields as form fields)."""

    seed: Seed = Field(0, description="seed for the binarisation and the ELBO's posterior sample")
    binarize: bool | None = Field(
        None, description="Bernoulli models only: binarise the input first, as in training (default: true)"
    )
    encoding: Encoding = Field("png", description=_ENCODING)

    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [EXAMPLE_PNG], "seed": 0}]})


class ElboTerms(BaseModel):
    elbo: float = Field(description="one-sample ELBO = recon - kl, nats")
    recon: float = Field(description="E_q[log p(x|z)] (one sample), nats")
    kl: float = Field(description="KL(q(z|x) || p(z)), nats (0 for a plain autoencoder)")
    elbo_bits_per_dim: float = Field(description="-ELBO in bits per dimension")


class ReconstructResponse(BaseModel):
    model: str
    version: Version
    seed: int
    binarized: bool = Field(description="whether the inputs were binarised before encoding")
    results: list[ElboTerms]
    images: ImagesOut = None
    pixels: PixelsOut = None


# -- score --------------------------------------------------------------------------------------------------------
class ScoreRequest(_ImagesIn):
    """JSON form of /v1/score (multipart: repeated `image` files plus these fields as form fields)."""

    k: int = Field(
        100,
        ge=1,
        description="importance samples per image (capped by the server's max_score_k); the OOD score is "
        "calibrated at the default",
    )
    fpr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="false-positive rate for is_anomaly: the share of in-distribution images flagged (default: the "
        "server's ood_fpr, 0.05)",
    )
    seed: Seed = Field(0, description="seed for the binarisation and every sample: equal requests, equal scores")
    binarize: bool | None = Field(
        None, description="Bernoulli models only: binarise the input first, as in training (default: true)"
    )

    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [EXAMPLE_PNG], "k": 100}]})


class Score(ElboTerms):
    log_likelihood: float = Field(description="importance-weighted estimate of log p(x) with k samples, nats")
    bits_per_dim: float = Field(description="-log p(x) in bits per dimension")
    complexity_bits: float = Field(description="the input's zlib-compressed length in bits (a complexity estimate)")
    ood_score: float | None = Field(
        None, description="out-of-distribution score (higher: less like the training data); null when uncalibrated"
    )
    p_value: float | None = Field(
        None, description="share of held-out in-distribution images scoring at least this high (calibrated)"
    )
    is_anomaly: bool | None = Field(None, description="p_value <= fpr: flagged as unlike the training data")


class ScoreResponse(BaseModel):
    model: str
    version: Version
    k: int
    seed: int
    binarized: bool
    calibrated: bool = Field(description="whether ood_score, p_value and is_anomaly are given (docs/anomaly.md)")
    fpr: float | None = Field(None, description="the false-positive rate is_anomaly was decided at")
    ood_note: str | None = Field(None, description="why there is no calibrated OOD score, when there is none")
    results: list[Score]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mnist",
                    "version": "1",
                    "k": 100,
                    "seed": 0,
                    "binarized": True,
                    "calibrated": True,
                    "fpr": 0.05,
                    "results": [
                        {
                            "elbo": -88.1,
                            "recon": -62.3,
                            "kl": 25.8,
                            "elbo_bits_per_dim": 0.1621,
                            "log_likelihood": -83.9,
                            "bits_per_dim": 0.1544,
                            "complexity_bits": 1312.0,
                            "ood_score": 4.2,
                            "p_value": 0.61,
                            "is_anomaly": False,
                        }
                    ],
                }
            ]
        }
    )


# -- raw bodies: Hugging Face's remote-VAE convention (diffusers' remote_decode / remote_encode) --------------------
# Query models of their own, so that their parameters are accepted with a raw body only: `?shape=` beside a JSON or
# multipart body stays a 422, as any unknown name.
_SHAPE = (
    "the tensor's shape, (N, C, H, W) images or (N, latent_dim) latents; repeated "
    "(`shape=1&shape=1&shape=28&shape=28`, as diffusers sends it), or `1,1,28,28`, or `[1,1,28,28]`"
)
_DTYPE = "the tensor's element type (little-endian); float images are in [-1, 1], uint8 ones in 0..255"
_OUTPUT_TYPE = (
    "tensor answers of images: pt = float32 (N, C, H, W) in [-1, 1], or uint8 (N, H, W, C) with "
    "partial_postprocess; pil = float32 (N, C, H, W) in [0, 1]. With an image Accept (or none), pil answers an image"
)
_SCALING = "diffusers' latent scaling: the model decodes latents / scaling_factor + shift_factor"


def _shape_list(value: Any) -> Any:
    """`shape` as clients send it: repeated (a list of strings), or one string `1,8` or `[1, 8]`."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        text = value[0].strip().removeprefix("[").removesuffix("]").strip()
        return [part.strip() for part in text.split(",")] if text else []
    return value


Shape = Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(max_length=8), BeforeValidator(_shape_list)]


class TensorQuery(ModelFormatQuery):
    """The query string of a raw body (docs/binary-tensors.md): a tensor, with its `shape` and `dtype`
    (Content-Type application/octet-stream, tensor/binary or none), or one PNG or JPEG file, with neither
    (Content-Type image/png, image/jpeg or none); then the endpoint's own options, which a JSON body carries."""

    shape: Shape | None = Field(None, description=_SHAPE)
    dtype: TensorDtype | None = Field(None, description=_DTYPE)

    @field_validator("dtype", mode="before")
    @classmethod
    def _known_dtype(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in TENSOR_DTYPES:
            raise ValueError(f"unknown dtype {value!r}; send one of {', '.join(TENSOR_DTYPES)}")
        return value


class ImageTensorQuery(TensorQuery):
    """A raw body's query string on the endpoints that answer with images: how the answer's images are made."""

    output_type: Literal["pt", "pil"] = Field("pt", description=_OUTPUT_TYPE)
    partial_postprocess: bool = Field(
        False, description="tensor answers with output_type=pt: uint8 (N, H, W, C), (N, H, W) for one channel"
    )
    image_format: Literal["png", "jpg"] = Field(
        "png", description="output_type=pil: the image's type when the Accept header leaves it open"
    )


class EncodeTensorQuery(TensorQuery):
    """/v1/encode's query string with a raw body."""

    sample: bool = Field(False, description="also draw z = mu + sigma * eps; a tensor answer is then z")
    seed: Seed | None = Field(None, description="seed for z (default: a fresh one, in the answer's `seed` header)")
    posterior: bool = Field(
        False, description="tensor answers: (N, 2, latent_dim) mean and log-variance (z third with sample=true)"
    )
    scaling_factor: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="tensor answers: (latent - shift_factor) * scaling_factor"
    )
    shift_factor: float | None = Field(None, allow_inf_nan=False, description="see scaling_factor")

    @model_validator(mode="after")
    def _scaling_needs_one_latent(self) -> EncodeTensorQuery:
        if self.posterior and (self.scaling_factor is not None or self.shift_factor is not None):
            raise ValueError("scaling_factor and shift_factor scale a latent answer, not posterior=true")
        return self


class DecodeTensorQuery(ImageTensorQuery):
    """/v1/decode's query string with a raw body."""

    encoding: Encoding = Field("png", description="JSON answers: " + _ENCODING_SHORT)
    scaling_factor: float | None = Field(None, gt=0, allow_inf_nan=False, description=_SCALING)
    shift_factor: float | None = Field(None, allow_inf_nan=False, description=_SCALING)
    do_scaling: bool = Field(
        False, description="diffusers' deprecated flag: the model's own scaling factor, 1 for these VAEs (a no-op)"
    )


class ReconstructTensorQuery(ImageTensorQuery):
    """/v1/reconstruct's query string with a raw body."""

    seed: Seed = Field(0, description="seed for the binarisation and the ELBO's posterior sample")
    binarize: bool | None = Field(None, description="Bernoulli models only: binarise the input first (default: true)")
    encoding: Encoding = Field("png", description="JSON answers: " + _ENCODING_SHORT)


class ScoreTensorQuery(TensorQuery):
    """/v1/score's query string with a raw body."""

    k: int = Field(100, ge=1, description="importance samples per image (capped by the server's max_score_k)")
    seed: Seed = Field(0, description="seed for the binarisation and every sample")
    binarize: bool | None = Field(None, description="Bernoulli models only: binarise the input first (default: true)")


# -- interpolate ----------------------------------------------------------------------------------------------------
class InterpolateRequest(_ImagesIn):
    """Two images (base64, pixel arrays, or two multipart `image` files) or two latents."""

    latents: list[Latent] | None = Field(None, description="two latent vectors (instead of two images)")
    steps: int = Field(8, ge=2, description="frames, ends included (capped by max_interpolate_steps)")
    path: Literal["linear", "spherical"] = Field("linear", description="straight line, or slerp (Shoemake 1985)")
    encoding: Encoding = Field("png", description=_ENCODING)

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"latents": [[-1.5, 0.0], [1.5, 0.5]], "steps": 8, "path": "spherical"}]}
    )


class InterpolateResponse(BaseModel):
    model: str
    version: Version
    path: str
    latents: list[list[float]] = Field(description="the codes decoded, one per frame")
    images: ImagesOut = None
    pixels: PixelsOut = None


# -- manifold -------------------------------------------------------------------------------------------------------
class ManifoldRequest(ModelFormatQuery):
    """GET /v1/manifold's query string."""

    steps: int = Field(15, ge=2, description="grid side (capped by max_manifold_steps)", examples=[20])
    encoding: Encoding = Field("png", description="JSON only: " + _ENCODING_SHORT)


class ManifoldResponse(BaseModel):
    model: str
    version: Version
    steps: int
    basis: Literal["prior", "principal_directions"]
    center: list[float]
    directions: list[list[float]]
    span: list[float] = Field(description="half-width of the grid along each direction")
    latents: list[list[float]] = Field(description="the steps x steps codes, row-major")
    images: ImagesOut = None
    pixels: PixelsOut = None


# -- health -------------------------------------------------------------------------------------------------------
class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    models: list[str]


# -- the request's way through the service -----------------------------------------------------------------------------
P = TypeVar("P", bound=BaseModel)


@dataclass
class Call(Generic[P]):
    """A request once its HTTP is read (service.decoding): everything the predictor needs, nothing of HTTP.

    `params` holds the validated fields (body, form fields and query string; `model` is the one model named);
    `files` the encoded images in order (multipart uploads, or the JSON `images` decoded from base64), `names` how
    errors name each; `tensor` a raw tensor instead (a binary body: images (N, C, H, W), uint8 in 0..255 or floats
    in [0, 1], or latents (N, latent_dim)); `format` the negotiated response format; `options` a raw body's query
    string (its shape and dtype, and how a tensor answer is made: service.rendering reads it)."""

    params: P
    format: Format = "json"
    files: list[bytes] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    tensor: np.ndarray | None = None
    options: TensorQuery | None = None


@dataclass
class Answer:
    """What the predictor says (VAEPredictor.encode_response), for service.rendering to put into a response.

    `fields` are the JSON body's fields in order (None ones are left out; float32 numpy arrays are written at
    float32 precision); `images` (N, C, H, W) in [0, 1] become a PNG grid of `nrow` per row, GIF frames, or the
    JSON's `images` / `pixels` field by `encoding`; `notes` are said in the X-Input-Converted header. `tensor` is
    the answer as one float32 array when the format is "tensor" and the answer holds no images (encode's latents,
    score's columns), `tensor_fields` the names along its second axis."""

    fields: dict[str, Any]
    images: torch.Tensor | None = None
    encoding: Encoding = "png"
    nrow: int | None = None
    padding: int = 2
    notes: list[str] = field(default_factory=list)
    tensor: np.ndarray | None = None
    tensor_fields: list[str] = field(default_factory=list)
