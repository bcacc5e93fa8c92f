"""One v2 inference, protocol-neutral: the version the request names, held while the model's Call goes through the
predictor and that version's batcher; the outputs as arrays. REST (service.v2.rest) and gRPC (service.v2.grpc_server)
decode into it and render what it returns.

    catalog.acquire               the model version that answers, held until its outputs are out (as /v1's answer)
    V2Model.call                  parameters and the input -> the /v1 verb's Call (EncodeRequest, ScoreRequest, ...)
    predictor.decode_request      the model's own checks (values, ranges), seeds and noise
    batcher.submit                the same queue, batches, limits and timeout as /v1
    predictor.encode_tensors      whole-batch output tensors (no per-item rows)
    V2Model.arrays                the outputs asked for, as numpy arrays
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.registry import ModelRegistry
from service.settings import Settings
from service.v2 import catalog
from service.v2.catalog import V2Model
from service.v2.codec import Inference, Result


async def answer(
    registry: ModelRegistry,
    name: str,
    version: str | None,
    decode: Callable[[V2Model], Inference],
    settings: Settings,
    cancel_on: Callable[[], Awaitable[Any]] | None = None,
) -> tuple[Inference, Result]:
    """The v2 model `name` at `version` (none: its default) held from decoding the request (`decode`: the request's
    tensors checked against that very version's shapes) until its outputs are out, then released with the time it
    took, or as failed. The Inference's model is the version that computed the Result."""
    model = catalog.acquire(registry, name, version)
    started = time.perf_counter()
    try:
        inference = decode(model)
        result = await run(inference, settings, cancel_on)
    except BaseException:
        model.served.release(None)
        raise
    model.served.release(time.perf_counter() - started)
    return inference, result


async def run(
    inference: Inference, settings: Settings, cancel_on: Callable[[], Awaitable[Any]] | None = None
) -> Result:
    """The inference's outputs (its model's version must be held); domain errors (service.errors) for anything that
    goes wrong. `cancel_on` as MicroBatcher.submit's: when it completes first, the request's queued work is
    withdrawn."""
    model = inference.model
    served = model.served
    call = model.call(inference.parameters, inference.tensor, inference.requested, settings)
    job = await served.predictor.decode_request(call)
    out = await served.batcher.submit(
        job.op, job.inputs, job.arg, timeout=settings.request_timeout_s, cancel_on=cancel_on
    )
    tensors = served.predictor.encode_tensors(job, out)
    return Result(model.arrays(tensors, inference.requested), model.response_parameters(job, call))
