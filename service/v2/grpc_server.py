"""The Open Inference Protocol's gRPC service, `inference.GRPCInferenceService`, on its own port (VAE_GRPC_PORT).

A grpc.aio server on the app's event loop, started and stopped by its lifespan (service.lifespan), so its requests
share the models' batchers with /v1 and /v2 REST. The messages are the ones tritonclient's generated stubs define
(`tritonclient.grpc.service_pb2`: Triton's superset of KServe's open_inference_grpc.proto, the same package, service
and field numbers), served through a generic handler that registers only what this server implements: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, and, when the server has an admin key, the
model repository extension's RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload (service.v2.repository;
the others answer UNIMPLEMENTED, as those three do while the admin API is off).

Errors are the domain errors' statuses as gRPC codes (service.errors.grpc_code); the API key, when the server has one,
is read from the `x-api-key` or `authorization: Bearer` metadata of every call but ServerLive and ServerReady; the
admin key from the `x-admin-key` metadata of the repository calls.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from service import __version__
from service.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServiceError,
    StartupError,
    Unauthorized,
    grpc_code,
    limit_hint,
)
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.settings import Settings
from service.v2 import catalog, codec, inference, repository
from service.v2.rest import extensions

logger = logging.getLogger("vae_serve")

SERVICE = "inference.GRPCInferenceService"
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
REPOSITORY_METHODS = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")  # with an admin key only
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # health checks: no API key, as on REST
# Typed contents (InferTensorContents) for each datatype, when a request sends values instead of raw bytes.
CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class InferenceServicer:
    """The RPCs, over the registry; each raises domain errors, which `_guard` turns into gRPC statuses."""

    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.registry.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            catalog.resolve(self.registry, request.name, request.version)
        except (ModelNotReady, ModelNotFound):  # as tritonclient.http reads REST's 503 and 404: not ready
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name="vae-serve", version=__version__, extensions=extensions(self.settings))

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        meta = catalog.resolve(self.registry, request.name, request.version).metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        def decode(model: catalog.V2Model) -> codec.Inference:
            return codec.decode(
                model,
                request.id or None,
                {name: parameter(value) for name, value in request.parameters.items()},
                wire_inputs(request),
                [(o.name, {k: parameter(v) for k, v in o.parameters.items()}) for o in request.outputs],
                self.settings,
            )

        # The version named (none: the default) held while it computes; a cancelled call withdraws its queued work.
        decoded, result = await inference.answer(
            self.registry, request.model_name, request.model_version, decode, self.settings
        )
        return pb.ModelInferResponse(
            model_name=decoded.model.name,
            model_version=decoded.model.version,
            id=request.id,
            parameters={k: infer_parameter(v) for k, v in result.parameters.items()},
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=codec.OUTPUT_DATATYPES[a.dtype], shape=list(a.shape)
                )
                for name, a in result.outputs.items()
            ],
            raw_output_contents=[a.tobytes() for a in result.outputs.values()],
        )

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        repository.check_repository(request.repository_name)
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=row.name, version=row.version or "", state=row.state, reason=row.reason)
                for row in repository.index(self.registry, request.ready)
            ]
        )

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        repository.check_repository(request.repository_name)
        parameters = {name: parameter(value) for name, value in request.parameters.items()}
        await repository.load(self.registry, request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        repository.check_repository(request.repository_name)
        parameters = {name: parameter(value) for name, value in request.parameters.items()}
        await repository.unload(self.registry, request.model_name, parameters)
        return pb.RepositoryModelUnloadResponse()


def wire_inputs(request: Any) -> list[codec.WireInput]:
    """The request's inputs: raw_input_contents (one per input, as tritonclient sends them) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        wire = codec.WireInput(tensor.name, tensor.datatype, list(tensor.shape))
        if raw:
            wire.raw = raw[i]
        else:
            field = CONTENTS.get(tensor.datatype)
            wire.values = np.asarray(getattr(tensor.contents, field)) if field else []
        inputs.append(wire)
    return inputs


def parameter(value: Any) -> Any:
    """An InferParameter (or a ModelRepositoryParameter) -> its Python value (None when unset)."""
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def infer_parameter(value: Any) -> Any:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


class GRPCServer:
    """The grpc.aio server and the port it listens on."""

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.port = port

    async def stop(self, grace: float) -> None:
        """Refuse new calls at once; let those in flight finish for up to `grace` seconds."""
        await self.server.stop(grace)


def handler(servicer: InferenceServicer, settings: Settings, metrics: Metrics) -> grpc.GenericRpcHandler:
    key = settings.api_key.get_secret_value().encode() if settings.api_key is not None else None
    admin_key = settings.admin_key.get_secret_value().encode() if settings.admin_key is not None else None
    methods = {}
    for name in METHODS + (REPOSITORY_METHODS if admin_key is not None else ()):
        method = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[name]
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        admin = admin_key if name in REPOSITORY_METHODS else None
        guarded = _guard(name, getattr(servicer, name), None if name in OPEN_METHODS else key, admin, metrics)
        methods[name] = grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
        )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _guard(name: str, call: Handler, key: bytes | None, admin_key: bytes | None, metrics: Metrics) -> Handler:
    """The RPC behind the API key check (and the admin key's, for the repository calls), its domain errors as gRPC
    statuses, and its count and time in the metrics."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "OK"
        try:
            if key is not None:
                check_key(context, key)
            if admin_key is not None:
                check_admin_key(context, admin_key)
            return await call(request, context)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed: its queued work is withdrawn
            code = "CANCELLED"
            raise
        except ServiceError as e:
            code, detail = grpc_code(e.status), e.detail
        except Exception:
            logger.exception("unhandled error in gRPC %s", name)
            code, detail = "INTERNAL", "internal server error"
        finally:
            metrics.grpc_request(name, code, time.perf_counter() - started)
        await context.abort(grpc.StatusCode[code], detail)

    return guarded


def check_key(context: grpc.aio.ServicerContext, key: bytes) -> None:
    given: bytes | None = None
    for name, value in context.invocation_metadata() or ():
        data = value.encode() if isinstance(value, str) else value
        if name == "x-api-key":
            given = data
            break
        if name == "authorization" and data[:7].lower() == b"bearer ":
            given = data[7:].strip()
    if given is None:
        raise Unauthorized("this server needs an API key: send x-api-key or authorization: Bearer metadata")
    if not hmac.compare_digest(given, key):
        raise Unauthorized("wrong API key")


def check_admin_key(context: grpc.aio.ServicerContext, key: bytes) -> None:
    given = next((value for name, value in context.invocation_metadata() or () if name == "x-admin-key"), None)
    if given is None:
        raise Unauthorized("this call needs the admin key: send x-admin-key metadata")
    if not hmac.compare_digest(given.encode() if isinstance(given, str) else given, key):
        raise Unauthorized("wrong admin key")


async def start(registry: ModelRegistry, settings: Settings, metrics: Metrics) -> GRPCServer:
    """Listen on settings.host:grpc_port (0: a free port); StartupError when the address cannot be bound."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port already taken is an error, never shared with another server
        ]
    )
    server.add_generic_rpc_handlers((handler(InferenceServicer(registry, settings), settings, metrics),))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        port, reason = 0, str(e)
    else:
        reason = "address in use?"
    if not port:
        raise StartupError(
            f"cannot serve gRPC on {address} ({reason}) {limit_hint('grpc_port')}, or turn it off: VAE_GRPC=false "
            "/ --no-grpc"
        )
    await server.start()
    logger.info("gRPC (Open Inference Protocol) on %s:%d", settings.host, port)
    return GRPCServer(server, port)
