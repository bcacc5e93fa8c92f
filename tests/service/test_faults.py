"""Faults: checkpoints truncated, edited, missing or swapped while the server starts; the device out of memory.

A bad checkpoint stops the start with one clear line (the server never serves half its models); once started, the
weights are in memory and the files are no longer needed. A batch that runs the device out of memory is split and
retried; a request that does not fit even alone gets 507 `out_of_memory`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from service_helpers import assert_error, copy_checkpoint, digit_like, files, png, serve

from model import checkpoint
from service.errors import StartupError
from service.main import create_app

pytestmark = pytest.mark.anyio
WEIGHTS, CARD = checkpoint.WEIGHTS_FILE, checkpoint.CARD_FILE


async def start_fails(settings, *fragments: str) -> str:
    app = create_app(settings)
    with pytest.raises(StartupError) as info:
        async with app.router.lifespan_context(app):
            pass
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def edit_card(ckpt: Path, edit) -> None:
    card = json.loads((ckpt / CARD).read_text())
    edit(card)
    (ckpt / CARD).write_text(json.dumps(card))


def scaled_weights(src: Path, dst: Path, factor: float = 2.0) -> Path:
    """Another valid safetensors file with the same names and shapes: what a swapped-in checkpoint looks like."""
    save_file({k: v * factor for k, v in load_file(str(src)).items()}, str(dst))
    return dst


# -- checkpoints at start-up ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "fragments"),
    [
        ("truncated", ("sha256", "corrupt, truncated or was replaced")),
        ("missing-weights", ("missing its weights file",)),
        ("swapped-weights", ("sha256",)),
        ("edited-config", ("config does not fit the weights",)),
        ("edited-hash", ("sha256",)),
        ("not-safetensors", ("not a readable safetensors file",)),
        ("empty-card", ("format_version",)),
    ],
)
async def test_a_bad_checkpoint_stops_the_start_with_one_line(
    settings_for, tiny_checkpoint, tmp_path, fault, fragments
) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "tiny")
    weights = ckpt / WEIGHTS
    if fault == "truncated":  # e.g. a copy still in progress
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif fault == "missing-weights":
        weights.unlink()
    elif fault == "swapped-weights":  # another model's weights under this card
        os.replace(scaled_weights(weights, tmp_path / "other.safetensors"), weights)
    elif fault == "edited-config":  # the card edited by hand: hash still right, architecture wrong
        edit_card(ckpt, lambda card: card["config"].update(hidden_dims=[32]))
    elif fault == "edited-hash":
        edit_card(ckpt, lambda card: card["weights"].update(sha256="0" * 64))
    elif fault == "not-safetensors":  # garbage whose hash the card was edited to match
        weights.write_bytes(b"\x00" * 64)
        edit_card(ckpt, lambda card: card["weights"].update(sha256=hashlib.sha256(b"\x00" * 64).hexdigest()))
    elif fault == "empty-card":
        (ckpt / CARD).write_text("{}")
    await start_fails(settings_for(models_dir=tmp_path), "cannot load model 'tiny'", *fragments)


async def test_one_bad_model_among_good_ones_stops_the_start(settings_for, tiny_checkpoint, tmp_path) -> None:
    """All or nothing: a server that came up without one of its models would answer 404 for it, which looks like a
    client's mistake. The log line names the bad one."""
    copy_checkpoint(tiny_checkpoint, tmp_path / "tiny")
    bad = copy_checkpoint(tiny_checkpoint, tmp_path / "tiny-copy")
    (bad / WEIGHTS).write_bytes((bad / WEIGHTS).read_bytes()[:100])
    await start_fails(settings_for(models_dir=tmp_path), "'tiny-copy'", "sha256")


async def test_weights_swapped_while_the_server_reads_them(settings_for, tiny_checkpoint, tmp_path, monkeypatch):
    """The file is replaced right after it was hashed (the worst moment): the server must serve the bytes it
    hashed, never a file it did not check."""
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "tiny")
    weights = ckpt / WEIGHTS
    other = scaled_weights(weights, tmp_path / "other.safetensors")
    real_sha256 = hashlib.sha256
    swaps = []

    class SwapAfterHashing:
        def __init__(self, data: bytes = b"") -> None:
            self.h = real_sha256(data)

        def update(self, data: bytes) -> None:
            self.h.update(data)

        def hexdigest(self) -> str:
            if not swaps:
                os.replace(other, weights)
                swaps.append(weights)
            return self.h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", SwapAfterHashing)
    async with serve(settings_for(models_dir=tmp_path)) as (app, _):
        served = app.state.registry.models["tiny"].predictor.model.state_dict()
    assert swaps, "the checkpoint was never hashed"
    expected = load_file(str(tiny_checkpoint / WEIGHTS))
    assert all(torch.equal(served[k], expected[k]) for k in expected)


async def test_once_started_the_files_are_not_needed(settings_for, tiny_checkpoint, tmp_path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "tiny")
    async with serve(settings_for(models_dir=tmp_path)) as (_, client):
        shutil.rmtree(ckpt)
        assert (await client.post("/v1/encode", files=files(png(digit_like(0))))).status_code == 200
        assert (await client.get("/v1/models/tiny")).status_code == 200
        assert (await client.get("/readyz")).json()["status"] == "ready"


# -- out of memory --------------------------------------------------------------------------------------------------
def out_of_memory_above(monkeypatch, module: torch.nn.Module, verb: str, limit: int, error: Exception) -> list[int]:
    """Make `module.<verb>` fail like a device out of memory for batches over `limit`; returns the batch sizes
    it was called with."""
    real = getattr(module, verb)
    sizes: list[int] = []

    def guarded(x: torch.Tensor, *args: object, **kwargs: object):
        sizes.append(len(x))
        if len(x) > limit:
            raise error
        return real(x, *args, **kwargs)

    monkeypatch.setattr(module, verb, guarded)
    return sizes


CUDA_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
CPU_OOM = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
    "to allocate 107374182400 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("error", [CUDA_OOM, CPU_OOM], ids=["cuda", "cpu"])
async def test_a_batch_too_large_for_the_device_is_split_and_retried(served, tiny_model, monkeypatch, error):
    app, client = served
    model = app.state.registry.models["tiny"].predictor.model
    sizes = out_of_memory_above(monkeypatch, model, "decode", 3, error)
    latents = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    r = await client.post("/v1/decode", json={"latents": latents.tolist(), "encoding": "pixels"})
    assert r.status_code == 200, r.text
    expected = tiny_model.mean_image(tiny_model.decode(latents))
    torch.testing.assert_close(torch.tensor(r.json()["pixels"]), expected, atol=1e-6, rtol=1e-5)
    assert sizes == [10, 5, 3, 2, 5, 3, 2]  # halves, until each fits


async def test_a_request_that_does_not_fit_even_alone_gets_507(served, monkeypatch) -> None:
    app, client = served
    model = app.state.registry.models["tiny"].predictor.model
    out_of_memory_above(monkeypatch, model, "encode", 0, CUDA_OOM)
    r = await client.post("/v1/encode", files=files(png(digit_like(0)), png(digit_like(1))))
    assert_error(r, 507, "out_of_memory", "ran out of memory", "a single image")
    r = await client.post("/v1/score", files=files(png(digit_like(0))), data={"k": "8"})
    assert_error(r, 507, "out_of_memory", "smaller k")
    assert (await client.get("/v1/sample?n=2&seed=0")).status_code == 200  # the decoder still fits: still serving
