"""The v2 models: every served checkpoint NAME is three models of the Open Inference Protocol, their tensors read from
the checkpoint itself (its input shape and latent size), never written down twice.

    NAME-encoder   images [-1, C, H, W] (UINT8 0..255 or FP32 in [0, 1]) -> mu, logvar [-1, latent_dim] (FP32), and
                   z (a sample from q(z|x)) with the parameter `sample: true` or when `z` is asked for; `seed`
    NAME-decoder   latents [-1, latent_dim] (FP32) -> images [-1, C, H, W] (FP32 in [0, 1], the decoder's mean) and
                   images_uint8 (UINT8, rounded as PNGs hold them)
    NAME-scorer    images -> elbo, recon, kl, elbo_bits_per_dim, log_likelihood, bits_per_dim, complexity_bits, and for
                   calibrated checkpoints ood_score, p_value, is_anomaly [-1] (FP32), as /v1/score;
                   `k`, `seed`, `binarize`. VAEs only: a plain autoencoder has no likelihood.

Each model's request parameters become the /v1 request schema of the same verb (EncodeRequest, ScoreRequest), so
defaults, ranges and limits are /v1's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from model import preprocess
from service.decoding import finish
from service.errors import InvalidInput, ModelNotFound
from service.predictor import Job
from service.registry import ModelRegistry, ServedModel
from service.schemas import Call, DecodeRequest, EncodeRequest, ScoreRequest
from service.settings import Settings

ROLES = ("encoder", "decoder", "scorer")
VERSION = "1"  # a served model has one version: the checkpoint it was started with
PLATFORM = "pytorch_safetensors"
# Request parameters of the protocol itself (the binary tensor data extension), taken by every model.
PROTOCOL_PARAMETERS = frozenset({"binary_data_output"})


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, the datatypes it takes (the first is the one its metadata names) and its shape,
    -1 for the batch."""

    name: str
    datatypes: tuple[str, ...]
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatypes[0], "shape": list(self.shape)}


@dataclass(frozen=True)
class V2Model:
    """One v2 model: a role (encoder, decoder, scorer) of one served checkpoint."""

    name: str
    role: str
    served: ServedModel
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: frozenset[str]

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise InvalidInput(
            f"model {self.name!r} has no output {name!r}; its outputs: {', '.join(o.name for o in self.outputs)}"
        )

    # -- a request's parameters and input -> the predictor's Call ------------------------------------------------
    def call(
        self, parameters: dict[str, Any], tensor: np.ndarray, requested: Sequence[str], settings: Settings
    ) -> Call[Any]:
        """The /v1 schema of this role's verb, from the request's parameters (unknown ones are refused, as /v1 refuses
        unknown query parameters), with `tensor` as its input; the schema's limits checked (k against max_score_k)."""
        unknown = sorted(set(parameters) - self.parameters - PROTOCOL_PARAMETERS)
        if unknown:
            takes = ", ".join(sorted(self.parameters | PROTOCOL_PARAMETERS))
            raise InvalidInput(
                f"model {self.name!r} takes no parameter {', '.join(map(repr, unknown))}; it takes: {takes}"
            )
        values = {k: v for k, v in parameters.items() if k in self.parameters} | {"model": self.served.name}
        params: BaseModel
        if self.role == "encoder":
            if "z" in requested:
                if values.setdefault("sample", True) is not True:
                    raise InvalidInput("output 'z' is a sample from q(z|x): it needs the parameter sample: true")
            params = validate(EncodeRequest, values)
        elif self.role == "decoder":
            params = DecodeRequest.model_construct(model=values["model"], latents=[], encoding="pixels")  # the tensor's
        else:
            params = validate(ScoreRequest, values)
        return finish(Call(params, tensor=tensor), None, settings)

    # -- the predictor's tensors -> this model's outputs ----------------------------------------------------------
    def response_parameters(self, job: Job, call: Call[Any]) -> dict[str, Any]:
        """What the answer depended on besides the input: the seed of a sample; the scorer's k, seed, binarisation."""
        if self.role == "scorer":
            return {"k": call.params.k, "seed": job.seed, "binarized": job.binarized}
        return {"seed": job.seed} if job.seed is not None else {}

    def arrays(self, tensors: dict[str, torch.Tensor], requested: Sequence[str]) -> dict[str, np.ndarray]:
        """The requested outputs (all that were computed when none are named), whole batches, in order."""
        names = list(requested) or [spec.name for spec in self.outputs if spec.name != "z" or "z" in tensors]
        arrays: dict[str, np.ndarray] = {}
        for name in names:
            if name == "images_uint8":
                arrays[name] = preprocess.to_uint8(tensors["image"]).numpy()
            else:
                arrays[name] = np.ascontiguousarray(tensors["image" if name == "images" else name].numpy())
        return arrays


def validate(schema: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """Parameters -> schema, strictly (`"seed": "5"` or `"sample": 1` is refused); InvalidInput naming each problem."""
    try:
        return schema.model_validate(values, strict=True)
    except ValidationError as e:
        raise InvalidInput(summarise(e, "parameter")) from None


def summarise(error: ValidationError, where: str) -> str:
    """A pydantic error as one line: `<where> <field>: <problem>; ...` (the first five)."""
    parts = []
    for err in error.errors(include_url=False)[:5]:
        loc = ".".join(map(str, err["loc"]))
        parts.append(f"{where} is not valid JSON" if err["type"] == "json_invalid" else f"{where} {loc}: {err['msg']}")
    more = len(error.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def v2_models(served: ServedModel) -> list[V2Model]:
    """The v2 models of one served checkpoint."""
    p = served.predictor
    c, h, w = p.input_shape
    images = TensorSpec("images", ("UINT8", "FP32"), (-1, c, h, w))
    latents = ("FP32",), (-1, p.latent_dim)
    models = [
        V2Model(
            f"{served.name}-encoder",
            "encoder",
            served,
            (images,),
            tuple(TensorSpec(n, *latents) for n in ("mu", "logvar", "z")),
            frozenset({"sample", "seed"}),
        ),
        V2Model(
            f"{served.name}-decoder",
            "decoder",
            served,
            (TensorSpec("latents", *latents),),
            (TensorSpec("images", ("FP32",), images.shape), TensorSpec("images_uint8", ("UINT8",), images.shape)),
            frozenset(),
        ),
    ]
    if p.is_vae:
        scores: tuple[str, ...] = ("elbo", "recon", "kl", "elbo_bits_per_dim", "log_likelihood", "bits_per_dim")
        scores += ("complexity_bits",)
        if p.calibration is not None:  # the calibrated OOD score (docs/anomaly.md); is_anomaly as 1.0 / 0.0
            scores += ("ood_score", "p_value", "is_anomaly")
        models.append(
            V2Model(
                f"{served.name}-scorer",
                "scorer",
                served,
                (images,),
                tuple(TensorSpec(n, ("FP32",), (-1,)) for n in scores),
                frozenset({"k", "seed", "binarize", "fpr"}),
            )
        )
    return models


def names(registry: ModelRegistry) -> list[str]:
    return [m.name for served in registry.models.values() for m in v2_models(served)]


def resolve(registry: ModelRegistry, name: str, version: str | None = None) -> V2Model:
    """The v2 model `name` (at `version`, if given); ModelNotReady before start-up has finished, ModelNotFound for a
    name or version not served (listing the names that are)."""
    base, _, role = name.rpartition("-")
    registry.get(None)  # ModelNotReady until every model is loaded
    served = registry.models.get(base) if role in ROLES else None
    found = [m for m in v2_models(served) if m.role == role] if served is not None else []
    if not found:
        raise ModelNotFound(f"unknown model {name!r}; served models: {', '.join(names(registry))}")
    if version not in (None, "", VERSION):
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its versions: {VERSION}")
    return found[0]
