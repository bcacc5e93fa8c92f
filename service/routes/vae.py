"""The model's verbs over HTTP: encode, decode, sample, reconstruct, interpolate, score, manifold.

Every verb takes the same way through the service, one stage a line (docs/architecture.md): its route decodes the
HTTP request into a Call, and `answer` does the rest.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from service import decoding, rendering
from service.deps import RegistryDep, SettingsDep
from service.openapi import OCTET_STREAM, image_responses, images_body, json_body, query, raw_body
from service.registry import ModelRegistry
from service.routing import LeanRoute
from service.schemas import (
    Call,
    DecodeRequest,
    DecodeResponse,
    DecodeTensorQuery,
    EncodeRequest,
    EncodeResponse,
    EncodeTensorQuery,
    InterpolateRequest,
    InterpolateResponse,
    ManifoldRequest,
    ManifoldResponse,
    ModelFormatQuery,
    ReconstructRequest,
    ReconstructResponse,
    ReconstructTensorQuery,
    SampleRequest,
    SampleResponse,
    ScoreRequest,
    ScoreResponse,
    ScoreTensorQuery,
)
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["vae"], route_class=LeanRoute)
VERSION_HEADER = "X-Model-Version"
VERSION_KEY = VERSION_HEADER.lower().encode("latin-1")


async def answer(request: Request, call: Call[Any], settings: Settings, registry: ModelRegistry) -> Response:
    """A decoded request through the model version it names: the predictor's contract around one trip through the
    version's batcher (withdrawn if the client disconnects first), then the response, which names the version."""
    served = registry.acquire(call.params.model)  # the one model version the request names, held until answered
    started = time.perf_counter()

    async def disconnected() -> None:
        # After the body has been read, the next ASGI message is http.disconnect: when the client goes away, or
        # when the response has been sent (by which time this watch has been cancelled).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        job = await served.predictor.decode_request(call)  # Call -> tensors for this model (domain errors only)
        out = await served.batcher.submit(  # the version's batcher: one batched predict() with other requests' items
            job.op, job.inputs, job.arg, timeout=settings.request_timeout_s, cancel_on=disconnected
        )
        result = served.predictor.encode_response(job, out, call)  # tensors -> plain values
        response = await rendering.render(
            result, call.format, settings.gif_frame_ms, call.options
        )  # JSON, image or tensor
    except BaseException:
        served.release(None)
        raise
    served.release(time.perf_counter() - started)
    response.raw_headers.append((VERSION_KEY, served.version_bytes))  # response.headers[...] = costs ~5 us more
    return response


@router.post(
    "/encode",
    response_model=EncodeResponse,
    responses=image_responses(EncodeResponse, OCTET_STREAM),
    openapi_extra=raw_body(images_body(EncodeRequest, ModelFormatQuery), EncodeTensorQuery),
)
async def encode_images(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """Encode images to the posterior q(z|x): mean and log-variance, and a seeded sample z on request."""
    call = await decoding.images_call(request, EncodeRequest, settings, ("json", "tensor"))
    return await answer(request, call, settings, registry)


@router.post(
    "/decode",
    response_model=DecodeResponse,
    responses=image_responses(DecodeResponse, "image/png", "image/jpeg", OCTET_STREAM),
    openapi_extra=raw_body(json_body(DecodeRequest, ModelFormatQuery), DecodeTensorQuery, images=False),
)
async def decode_latents(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """Decode latent vectors to images (the decoder's mean: probabilities for Bernoulli models, never logits)."""
    call = await decoding.json_call(request, DecodeRequest, settings, ("json", "png", "jpeg", "tensor"))
    return await answer(request, call, settings, registry)


@router.get(
    "/sample",
    response_model=SampleResponse,
    responses=image_responses(SampleResponse, "image/png"),
    openapi_extra=query(SampleRequest),
)
async def sample_images(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """Draw images from the prior: z ~ N(0, temperature^2 I), decoded. A PNG grid or JSON.

    A plain autoencoder samples too: decoding N(0, I) codes shows that its code space is not the prior's (see
    docs/ae-vs-vae.md), which is the point of serving it."""
    call = decoding.query_call(request, SampleRequest, settings, ("json", "png"))
    return await answer(request, call, settings, registry)


@router.post(
    "/reconstruct",
    response_model=ReconstructResponse,
    responses=image_responses(ReconstructResponse, "image/png", "image/jpeg", OCTET_STREAM),
    openapi_extra=raw_body(images_body(ReconstructRequest, ModelFormatQuery), ReconstructTensorQuery),
)
async def reconstruct_images(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """Reconstruct images through the posterior mean, with each image's ELBO, reconstruction term and KL."""
    call = await decoding.images_call(request, ReconstructRequest, settings, ("json", "png", "jpeg", "tensor"))
    return await answer(request, call, settings, registry)


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses=image_responses(ScoreResponse, OCTET_STREAM),
    openapi_extra=raw_body(images_body(ScoreRequest, ModelFormatQuery), ScoreTensorQuery),
)
async def score_images(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """Score images: ELBO and importance-weighted log-likelihood (nats, bits/dim); low scores flag anomalies."""
    call = await decoding.images_call(request, ScoreRequest, settings, ("json", "tensor"))
    return await answer(request, call, settings, registry)


@router.post(
    "/interpolate",
    response_model=InterpolateResponse,
    responses=image_responses(InterpolateResponse, "image/png", "image/gif"),
    openapi_extra=images_body(InterpolateRequest, ModelFormatQuery),
)
async def interpolate(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """Frames between two images (their posterior means) or two latents, along a line or a great circle."""
    call = await decoding.images_call(request, InterpolateRequest, settings, ("json", "png", "gif"))
    return await answer(request, call, settings, registry)


@router.get(
    "/manifold",
    response_model=ManifoldResponse,
    responses=image_responses(ManifoldResponse, "image/png"),
    openapi_extra=query(ManifoldRequest),
)
async def latent_manifold(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """The decoded steps x steps grid over a 2-D latent plane (paper Fig. 4): the prior's plane for 2-D models,
    else the two leading principal directions of the training codes recorded in the card."""
    call = decoding.query_call(request, ManifoldRequest, settings, ("json", "png"))
    return await answer(request, call, settings, registry)
