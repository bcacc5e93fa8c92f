"""One v2 inference, protocol-neutral: the model's Call through the predictor and the model's batcher, the outputs as
arrays. REST (service.v2.rest) and gRPC (service.v2.grpc_server) decode into it and render what it returns.

    V2Model.call                  parameters and the input -> the /v1 verb's Call (EncodeRequest, ScoreRequest, ...)
    predictor.decode_request      the model's own checks (values, ranges), seeds and noise
    batcher.submit                the same queue, batches, limits and timeout as /v1
    predictor.encode_tensors      whole-batch output tensors (no per-item rows)
    V2Model.arrays                the outputs asked for, as numpy arrays
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from service.settings import Settings
from service.v2.codec import Inference, Result


async def run(
    inference: Inference, settings: Settings, cancel_on: Callable[[], Awaitable[Any]] | None = None
) -> Result:
    """The inference's outputs; domain errors (service.errors) for anything that goes wrong. `cancel_on` as
    MicroBatcher.submit's: when it completes first, the request's queued work is withdrawn."""
    model = inference.model
    served = model.served
    call = model.call(inference.parameters, inference.tensor, inference.requested, settings)
    job = await served.predictor.decode_request(call)
    out = await served.batcher.submit(
        job.op, job.inputs, job.arg, timeout=settings.request_timeout_s, cancel_on=cancel_on
    )
    tensors = served.predictor.encode_tensors(job, out)
    return Result(model.arrays(tensors, inference.requested), model.response_parameters(job, call))
