"""The checkpoint format both the trainer and the service use.

A checkpoint is a directory:
    weights.safetensors   the model's state_dict (no optimiser state, no pickle)
    model_card.json       format version, architecture config, input spec, dataset, metrics, latent statistics,
                          training command and provenance, and the sha256 of the weights file

Loading validates everything and raises CheckpointError with one message naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from model.vae import VAE, VAEConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model_card.json"
# Prefixes added by torch.compile and DistributedDataParallel; stripped so loaders need no patch.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing file, bad hash, unknown version, or config/weights mismatch."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves half a card."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a card is meant to be read by others (e.g. a container user)
    os.replace(tmp, path)


def save(model: torch.nn.Module, card: dict[str, Any], directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Write weights and card into `directory` (created if needed); returns the card as written.

    `card` carries everything but the format version, the config and the weights' hash, which are filled in here.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = cast(VAEConfig, getattr(model, "module", model).config)
    weights = directory / WEIGHTS_FILE
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(clean_state_dict(model.state_dict()), str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, weights)
    card = {
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in card.items() if k not in ("format_version", "config", "weights")},
        "config": config.to_dict(),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights), "bytes": weights.stat().st_size},
    }
    write_json_atomic(directory / CARD_FILE, card)
    return card


def read_card(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The model card alone, validated for format version and config (no weights are read)."""
    directory = Path(directory)
    path = directory / CARD_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {CARD_FILE}")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unknown format_version {version!r} (this version of vae-serve reads {FORMAT_VERSION})"
        )
    try:
        VAEConfig.from_dict(card["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config: {e}") from None
    return card


def update_card(directory: str | os.PathLike[str], **sections: Any) -> dict[str, Any]:
    """Merge sections (e.g. metrics=...) into an existing card, keeping everything else."""
    card = read_card(directory)
    for key, value in sections.items():
        card[key] = {**card.get(key, {}), **value} if isinstance(value, dict) else value
    write_json_atomic(Path(directory) / CARD_FILE, card)
    return card


def load(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[VAE, dict[str, Any]]:
    """Validate and load a checkpoint -> (model in eval mode on `device`, card)."""
    directory = Path(directory)
    card = read_card(directory)
    config = VAEConfig.from_dict(card["config"])
    weights_info = card.get("weights") or {}
    weights = directory / weights_info.get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {directory} is missing its weights file {weights.name}")
    expected = weights_info.get("sha256")
    if not expected:
        raise CheckpointError(f"{directory / CARD_FILE} records no sha256 for {weights.name}")
    # Read once: the bytes hashed are the bytes loaded, even if the file is replaced meanwhile.
    data = weights.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"{weights} does not match its card: sha256 {actual[:12]}... != {expected[:12]}... "
            "(the file is corrupt, truncated or was replaced)"
        )
    try:
        state = load_bytes(data)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    model = VAE(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{directory}: the config does not fit the weights ({' '.join(s.strip() for s in first[:3])})"
        ) from None
    return model.to(device).eval(), card
