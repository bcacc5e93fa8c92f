"""Deployment settings (never architecture: that comes from each checkpoint's card)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every field can be set as `VAE_<FIELD>` in the environment or as `--<field>` on `python -m service`.

    Relative paths (`models_dir`, entries of `models`) resolve against the current working directory of the
    server process, so `python -m service` run from the repository root serves `./checkpoints/`.
    """

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="forbid", validate_default=True)

    # -- what to serve -----------------------------------------------------------------------------------------
    models_dir: Path = Field(Path("checkpoints"), description="folder holding one checkpoint directory per model")
    models: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="model names (sub-directories of models_dir) or checkpoint paths to serve; "
        "default: every directory in models_dir that holds a model_card.json (env: comma-separated)",
    )
    default_model: str | None = Field(
        None,
        description="model used when a request names none; default: the only model served, else `mnist` when "
        "served, else the first name in alphabetical order",
    )
    # -- where and how it runs ---------------------------------------------------------------------------------
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="weights dtype on GPU only")
    cpu_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    warmup: bool = Field(True, description="run one forward per model before reporting ready")
    # -- batching and backpressure -----------------------------------------------------------------------------
    batching: bool = Field(True, description="merge concurrent requests into one forward pass per model")
    max_batch_size: int = Field(64, ge=1, description="most images in one forward pass")
    max_wait_ms: float = Field(0.0, ge=0, description="extra wait for a batch to fill; 0: never wait when idle")
    inline_max_images: int = Field(
        8,
        ge=0,
        description="on CPU, a request of at most this many images that is alone in the server and finds the model "
        "idle runs its forward on the event loop, skipping the hand-offs to the worker thread; 0: never",
    )
    inline_linger_us: float = Field(
        300.0,
        ge=0,
        description="after such a lone request, the event loop polls for the next one this long instead of "
        "sleeping (waking an idle CPU cost ~0.2 ms on the VMs measured); CPU for latency; 0: never",
    )
    queue_size: int = Field(1024, ge=1, description="most images waiting per model; beyond it requests get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered within this gets 504")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header sent with 503 when overloaded")
    # -- request limits ----------------------------------------------------------------------------------------
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not fully received this long after reading starts gets 408"
    )
    max_images_per_request: int = Field(64, ge=1, description="most images or latents in one request")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest uploaded image (width * height)")
    max_sample_n: int = Field(256, ge=1, description="most images one /v1/sample call returns")
    max_score_k: int = Field(1000, ge=1, description="most importance samples per image in /v1/score")
    ood_fpr: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="/v1/score's default false-positive rate for is_anomaly (a request's `fpr` overrides it)",
    )
    max_interpolate_steps: int = Field(64, ge=2, description="most frames one /v1/interpolate call returns")
    max_manifold_steps: int = Field(30, ge=2, description="largest side of the /v1/manifold grid")
    gif_frame_ms: int = Field(100, ge=10, description="frame duration of animated GIFs")
    # -- security ----------------------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        None, description="when set, /v1 endpoints need `X-API-Key: <key>` or `Authorization: Bearer <key>`"
    )
    cors_origins: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="browser origins allowed to call the API (CORS), or `*` for any; default: none, CORS off "
        "(env: comma-separated)",
    )
    # -- models at run time (docs/models.md) ------------------------------------------------------------------
    admin_key: SecretStr | None = Field(
        None,
        description="when set, the admin API is on: POST /v1/models/{name}/reload, /load and /unload and the v2 "
        "repository extension (POST /v2/repository/...) need `X-Admin-Key: <key>`; unset, those routes answer 404",
    )
    watch_models_s: float = Field(
        0.0,
        ge=0,
        description="every this many seconds, reload the models whose folders changed (and load new ones when "
        "serving all of models_dir); 0: off",
    )
    # -- the Open Inference Protocol's gRPC service, started and stopped with the app -------------------------
    grpc: bool = Field(True, description="serve the v2 gRPC service (GRPCInferenceService) on grpc_port too")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="TCP port of the gRPC service, on `host` (0: any free port)"
    )
    # -- server (used by `python -m service`; the gRPC service binds `host` too) -----------------------------
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level of the server and uvicorn: critical, error, warning, info or debug"
    )
    access_log: bool = Field(True, description="one log line per request")
    otel: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (a span, metrics and logs per request) when an OpenTelemetry SDK "
        "is configured in the process; off: FastAPI does not look for one on every request",
    )
    graceful_shutdown_s: float = Field(20.0, gt=0, description="on SIGTERM, the longest wait for requests in flight")
    max_connections: int | None = Field(
        None,
        ge=1,
        description="most connections and requests open at once; beyond it uvicorn answers 503 at once "
        "(default: no cap; the queue limit still sheds model work)",
    )

    @field_validator("models", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()] or None
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @model_validator(mode="after")
    def _two_ports(self) -> Settings:
        if self.grpc and self.grpc_port == self.port != 0:
            raise ValueError(f"grpc_port and port are both {self.port}: the gRPC service needs a port of its own")
        return self

    @field_validator("api_key", "admin_key")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None


@lru_cache
def get_settings() -> Settings:
    """The process's settings, built once from the environment (tests pass Settings(...) to create_app instead)."""
    return Settings()
