"""The v2 gRPC service in-process (tritonclient.grpc.aio on the app's own event loop): its life with the app's
lifespan, the API key, typed contents, error codes and metrics."""

from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from service_helpers import serve
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException
from v2_helpers import images_uint8

from service.errors import StartupError
from service.main import create_app
from service.settings import Settings

pytestmark = pytest.mark.anyio


def images_input(images: np.ndarray) -> aioclient.InferInput:
    tensor = aioclient.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


async def test_the_api_key_guards_all_but_health(settings_for) -> None:
    async with serve(settings_for(grpc=True, grpc_port=0, api_key="sesame")) as (app, _):
        url = f"127.0.0.1:{app.state.grpc_port}"
        async with aioclient.InferenceServerClient(url) as client:
            assert await client.is_server_live() and await client.is_server_ready()
            with pytest.raises(InferenceServerException, match="needs an API key") as info:
                await client.get_model_metadata("tiny-encoder")
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException, match="wrong API key"):
                await client.infer("tiny-encoder", [images_input(images_uint8(1))], headers={"x-api-key": "nope"})
            meta = await client.get_model_metadata("tiny-encoder", headers={"authorization": "Bearer sesame"})
            assert meta.name == "tiny-encoder"
            result = await client.infer(
                "tiny-encoder", [images_input(images_uint8(2))], headers={"x-api-key": "sesame"}
            )
            assert result.as_numpy("mu").shape == (2, 2)


async def test_typed_contents_equal_raw_bytes_and_calls_are_counted(settings_for) -> None:
    """A request may carry values in InferTensorContents instead of raw_input_contents (KServe's clients do)."""
    async with serve(settings_for(grpc=True, grpc_port=0)) as (app, client):
        images = images_uint8(2)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=list(images.shape))
            typed = pb.ModelInferRequest(model_name="tiny-encoder", id="t", inputs=[tensor])
            typed.inputs[0].contents.uint_contents.extend(images.reshape(-1).tolist())
            raw = pb.ModelInferRequest(
                model_name="tiny-encoder", inputs=[tensor], raw_input_contents=[images.tobytes()]
            )
            a, b = await stub.ModelInfer(typed), await stub.ModelInfer(raw)
            assert a.id == "t" and [o.name for o in a.outputs] == ["mu", "logvar"]
            assert a.raw_output_contents == b.raw_output_contents
            typed.inputs[0].contents.uint_contents[0] = 256
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(typed)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "0..255" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:  # not implemented here: Triton's extras
                await stub.ModelStatistics(pb.ModelStatisticsRequest())
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        metrics = (await client.get("/metrics")).text
    assert 'vae_grpc_requests_total{code="OK",method="ModelInfer"} 2.0' in metrics
    assert 'vae_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"} 1.0' in metrics


async def test_shutdown_lets_calls_in_flight_finish_and_refuses_new_ones(settings_for) -> None:
    app = create_app(settings_for(grpc=True, grpc_port=0))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    batcher = app.state.registry.models["tiny"].batcher
    forward, entered, gate = batcher._forward, threading.Event(), threading.Event()

    def gated(op, inputs, arg=None):
        entered.set()
        gate.wait(15)  # longer than the refusal check below takes on a loaded machine; shorter than the 20-s grace
        return forward(op, inputs, arg)

    batcher._forward = gated
    batcher._inline_max = 0  # held at the gate on the worker thread, not on the event loop (inline_max_images)
    url = f"127.0.0.1:{app.state.grpc_port}"
    async with aioclient.InferenceServerClient(url) as client, aioclient.InferenceServerClient(url) as late:
        assert await late.is_server_live()
        call = asyncio.ensure_future(client.infer("tiny-encoder", [images_input(images_uint8(2))]))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
        for _ in range(500):  # new calls are refused once the stop has begun
            try:
                await late.is_server_live()
            except InferenceServerException:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the gRPC server still takes new calls while stopping")
        assert not stopping.done()  # waiting for the call in flight
        gate.set()
        assert (await call).as_numpy("mu").shape == (2, 2)
        await stopping


async def test_messages_over_max_request_bytes_are_refused(settings_for) -> None:
    async with serve(settings_for(grpc=True, grpc_port=0, max_request_bytes=2048)) as (app, _):
        async with aioclient.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}") as client:
            tensor = aioclient.InferInput("images", [10, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(np.zeros((10, 1, 8, 8), np.float32))  # 2560 bytes
            with pytest.raises(InferenceServerException) as info:
                await client.infer("tiny-encoder", [tensor])
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            small = aioclient.InferInput("images", [1, 1, 8, 8], "FP32")
            small.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
            assert (await client.infer("tiny-encoder", [small])).as_numpy("mu").shape == (1, 2)


async def test_a_port_already_taken_stops_the_start(settings_for) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = create_app(settings_for(grpc=True, grpc_port=taken.getsockname()[1]))
        with pytest.raises(StartupError, match="cannot serve gRPC on 127.0.0.1:.*VAE_GRPC_PORT.*--no-grpc"):
            await app.router.lifespan_context(app).__aenter__()
    assert not app.state.registry.ready


def test_the_grpc_port_is_its_own() -> None:
    with pytest.raises(ValueError, match="grpc_port and port are both 9000"):
        Settings(port=9000, grpc_port=9000)
    assert Settings(port=9000, grpc_port=9000, grpc=False).grpc_port == 9000
