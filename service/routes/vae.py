"""The model's verbs over HTTP: encode, decode, sample, reconstruct, interpolate, score, manifold.

Kept thin: parse and validate (payloads, predictor), submit to the model's batcher, render the response."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from model.preprocess import binarize
from service import deps
from service.errors import InvalidInput
from service.predictor import Tensors, VAEPredictor
from service.routes.direct import DirectRoute
from service.routes.payloads import (
    ERRORS,
    float32_rows,
    fresh_seed,
    generator,
    gif_response,
    image_fields,
    image_inputs,
    image_responses,
    images_body,
    json_body,
    json_fields_response,
    json_response,
    negotiate,
    png_response,
    read_images_request,
    read_json,
    run,
)
from service.schemas import (
    DecodeRequest,
    DecodeResponse,
    ElboTerms,
    EncodeRequest,
    EncodeResponse,
    InterpolateRequest,
    InterpolateResponse,
    ManifoldResponse,
    ReconstructRequest,
    ReconstructResponse,
    SampleResponse,
    Score,
    ScoreRequest,
    ScoreResponse,
    Seed,
)

router = APIRouter(prefix="/v1", tags=["vae"], route_class=DirectRoute)

ModelQuery = Annotated[
    str | None, Query(description="served model name (default: the server's default)", examples=["mnist"])
]
FormatQuery = Annotated[
    Literal["json", "png", "gif"] | None,
    Query(description="response format; overrides the Accept header (default: JSON)"),
]
EncodingQuery = Annotated[
    Literal["png", "pixels"], Query(description="JSON only: images as base64 PNGs, or as pixel arrays in [0, 1]")
]


@router.post("/encode", response_model=EncodeResponse, responses=ERRORS, openapi_extra=images_body(EncodeRequest))
async def encode_images(request: Request) -> Response:
    """Encode images to the posterior q(z|x): mean and log-variance, and a seeded sample z on request."""
    settings, registry = deps.settings(request), deps.registry(request)
    req, uploads = await read_images_request(request, EncodeRequest, settings)
    served = registry.get(req.model)
    p = served.predictor
    x = await image_inputs(p, settings, uploads, req.images, req.pixels)
    inputs = {"x": x}
    seed = None
    if req.sample:
        seed = req.seed if req.seed is not None else fresh_seed()
        inputs["eps"] = p.noise(len(x), generator(seed))
    return encode_response(p, await run(served, request, settings, "encode", inputs), seed)


def encode_response(p: VAEPredictor, out: Tensors, seed: int | None) -> Response:
    """EncodeResponse's JSON from the encode forward's outputs (bench/inprocess.py times it)."""
    keys = [k for k in ("mu", "logvar", "z") if k in out]  # Posterior's fields
    results = [dict(zip(keys, row, strict=True)) for row in zip(*(float32_rows(out[k]) for k in keys), strict=True)]
    seeded = {} if seed is None else {"seed": seed}
    return json_fields_response({"model": p.name, "latent_dim": p.latent_dim, **seeded, "results": results})


@router.post(
    "/decode",
    response_model=DecodeResponse,
    responses=image_responses(DecodeResponse, "image/png"),
    openapi_extra=json_body(DecodeRequest),
)
async def decode_latents(request: Request, format: FormatQuery = None) -> Response:
    """Decode latent vectors to images (the decoder's mean: probabilities for Bernoulli models, never logits)."""
    settings, registry = deps.settings(request), deps.registry(request)
    fmt = negotiate(request, format, ("json", "png"))
    req = await read_json(request, DecodeRequest, settings)
    served = registry.get(req.model)
    p = served.predictor
    if len(req.latents) > settings.max_images_per_request:
        raise InvalidInput(f"too many latents: {len(req.latents)}, at most {settings.max_images_per_request}")
    z = p.latents_tensor(req.latents)
    images = (await run(served, request, settings, "decode", {"z": z}))["image"]
    if fmt == "png":
        return await png_response(p.grid(images))
    return json_response(DecodeResponse(model=p.name, **image_fields(images, req.encoding)))


@router.get("/sample", response_model=SampleResponse, responses=image_responses(SampleResponse, "image/png"))
async def sample_images(
    request: Request,
    n: Annotated[int, Query(ge=1, description="images to draw (capped by max_sample_n)", examples=[16])] = 16,
    seed: Annotated[
        Seed | None, Query(description="same seed, same images (default: a fresh one)", examples=[0])
    ] = None,
    temperature: Annotated[
        float, Query(gt=0, allow_inf_nan=False, description="scales the prior's standard deviation", examples=[0.8])
    ] = 1.0,
    model: ModelQuery = None,
    encoding: EncodingQuery = "png",
    format: FormatQuery = None,
) -> Response:
    """Draw images from the prior: z ~ N(0, temperature^2 I), decoded. A PNG grid or JSON."""
    settings, registry = deps.settings(request), deps.registry(request)
    fmt = negotiate(request, format, ("json", "png"))
    served = registry.get(model)
    p = served.predictor
    # A plain autoencoder samples too: decoding N(0, I) codes shows that its code space is not the prior's
    # (see docs/ae-vs-vae.md), which is the point of serving it.
    if n > settings.max_sample_n:
        raise InvalidInput(f"n={n} is over the limit of {settings.max_sample_n} images per call")
    seed = seed if seed is not None else fresh_seed()
    z = p.noise(n, generator(seed)) * temperature
    images = (await run(served, request, settings, "decode", {"z": z}))["image"]
    if fmt == "png":
        return await png_response(p.grid(images))
    body = SampleResponse(model=p.name, seed=seed, temperature=temperature, latents=z.tolist(),
                          **image_fields(images, encoding))  # fmt: skip
    return json_response(body)


@router.post(
    "/reconstruct",
    response_model=ReconstructResponse,
    responses=image_responses(ReconstructResponse, "image/png"),
    openapi_extra=images_body(ReconstructRequest),
)
async def reconstruct_images(request: Request, format: FormatQuery = None) -> Response:
    """Reconstruct images through the posterior mean, with each image's ELBO, reconstruction term and KL."""
    settings, registry = deps.settings(request), deps.registry(request)
    fmt = negotiate(request, format, ("json", "png"))
    req, uploads = await read_images_request(request, ReconstructRequest, settings)
    served = registry.get(req.model)
    p = served.predictor
    x = await image_inputs(p, settings, uploads, req.images, req.pixels)
    g = generator(req.seed)
    binarized = p.bernoulli and req.binarize is not False
    if binarized:
        x = binarize(x, g)  # as Bernoulli models were trained and evaluated
    out = await run(served, request, settings, "reconstruct", {"x": x, "eps": p.noise(len(x), g)})
    if fmt == "png":
        return await png_response(p.grid(out["image"]))
    results = [
        ElboTerms(elbo=e, recon=r, kl=k, elbo_bits_per_dim=p.bits_per_dim(-e))
        for e, r, k in zip(out["elbo"].tolist(), out["recon"].tolist(), out["kl"].tolist(), strict=True)
    ]
    body = ReconstructResponse(model=p.name, seed=req.seed, binarized=binarized, results=results,
                               **image_fields(out["image"], req.encoding))  # fmt: skip
    return json_response(body)


@router.post("/score", response_model=ScoreResponse, responses=ERRORS, openapi_extra=images_body(ScoreRequest))
async def score_images(request: Request) -> Response:
    """Score images: ELBO and importance-weighted log-likelihood (nats, bits/dim); low scores flag anomalies."""
    settings, registry = deps.settings(request), deps.registry(request)
    req, uploads = await read_images_request(request, ScoreRequest, settings)
    served = registry.get(req.model)
    p = served.predictor
    p.require_vae("scoring (ELBO and log-likelihood)")
    if req.k > settings.max_score_k:
        raise InvalidInput(f"k={req.k} is over the limit of {settings.max_score_k} importance samples")
    x = await image_inputs(p, settings, uploads, req.images, req.pixels)
    g = generator(req.seed)
    binarized = p.bernoulli and req.binarize is not False
    if binarized:
        x = binarize(x, g)  # as Bernoulli models were trained and evaluated
    out = await run(served, request, settings, "score", {"x": x}, arg=(req.k, g))
    rows = zip(*(out[key].tolist() for key in ("elbo", "recon", "kl", "log_likelihood")), strict=True)
    results = [
        Score(
            elbo=e,
            recon=r,
            kl=k,
            log_likelihood=ll,
            bits_per_dim=p.bits_per_dim(-ll),
            elbo_bits_per_dim=p.bits_per_dim(-e),
        )  # fmt: skip
        for e, r, k, ll in rows
    ]
    return json_response(ScoreResponse(model=p.name, k=req.k, seed=req.seed, binarized=binarized, results=results))


@router.post(
    "/interpolate",
    response_model=InterpolateResponse,
    responses=image_responses(InterpolateResponse, "image/png", "image/gif"),
    openapi_extra=images_body(InterpolateRequest),
)
async def interpolate(request: Request, format: FormatQuery = None) -> Response:
    """Frames between two images (their posterior means) or two latents, along a line or a great circle."""
    settings, registry = deps.settings(request), deps.registry(request)
    fmt = negotiate(request, format, ("json", "png", "gif"))
    req, uploads = await read_images_request(request, InterpolateRequest, settings)
    served = registry.get(req.model)
    p = served.predictor
    if req.steps > settings.max_interpolate_steps:
        raise InvalidInput(f"steps={req.steps} is over the limit of {settings.max_interpolate_steps}")
    if req.latents is not None:
        if uploads or req.images or req.pixels:
            raise InvalidInput("send two images or two latents, not both")
        if len(req.latents) != 2:
            raise InvalidInput(f"send exactly 2 latents (got {len(req.latents)})")
        ends = p.latents_tensor(req.latents)
    else:
        x = await image_inputs(p, settings, uploads, req.images, req.pixels, exactly=2)
        ends = (await run(served, request, settings, "encode", {"x": x}))["mu"]
    codes = p.interpolation_path(ends[0], ends[1], req.steps, req.path)
    images = (await run(served, request, settings, "decode", {"z": codes}))["image"]
    if fmt == "png":
        return await png_response(p.grid(images, nrow=len(images)))
    if fmt == "gif":
        return await gif_response(p.to_pil(images), settings.gif_frame_ms)
    body = InterpolateResponse(model=p.name, path=req.path, latents=codes.tolist(),
                               **image_fields(images, req.encoding))  # fmt: skip
    return json_response(body)


@router.get("/manifold", response_model=ManifoldResponse, responses=image_responses(ManifoldResponse, "image/png"))
async def latent_manifold(
    request: Request,
    steps: Annotated[int, Query(ge=2, description="grid side (capped by max_manifold_steps)", examples=[20])] = 15,
    model: ModelQuery = None,
    encoding: EncodingQuery = "png",
    format: FormatQuery = None,
) -> Response:
    """The decoded steps x steps grid over a 2-D latent plane (paper Fig. 4): the prior's plane for 2-D models,
    else the two leading principal directions of the training codes recorded in the card."""
    settings, registry = deps.settings(request), deps.registry(request)
    fmt = negotiate(request, format, ("json", "png"))
    served = registry.get(model)
    p = served.predictor
    if steps > settings.max_manifold_steps:
        raise InvalidInput(f"steps={steps} is over the limit of {settings.max_manifold_steps}")
    codes, plane = p.manifold_codes(steps)
    images = (await run(served, request, settings, "decode", {"z": codes}))["image"]
    if fmt == "png":
        return await png_response(p.grid(images, nrow=steps, padding=0))
    body = ManifoldResponse(model=p.name, steps=steps, latents=codes.tolist(), **plane,
                            **image_fields(images, encoding))  # fmt: skip
    return json_response(body)
