"""/v1/score's out-of-distribution fields on tiny models: a calibrated checkpoint answers ood_score, a p-value in
[0, 1] that falls as the score rises, and is_anomaly at the request's (or the server's) false-positive rate; an
uncalibrated one, or grey input to a Bernoulli model, answers the plain scores and says why there is no OOD score."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_helpers import assert_error, digit_like, files, png, serve

from model import checkpoint
from model.anomaly import DEFAULT_K
from model.calibrate import calibrate
from service.schemas import ScoreRequest

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, calibrated on 60 held-out synthetic images like its training data."""
    out = tmp_path_factory.mktemp("calibrated") / "tiny-cal"
    shutil.copytree(tiny_checkpoint, out)
    model, _ = checkpoint.load(out)
    x = torch.stack([torch.from_numpy(digit_like(100 + i)).float().div(255)[None] for i in range(60)])
    assert calibrate(model, x, out, k=8, log=lambda _: None) is not None
    return out


@pytest.fixture(scope="module")
async def cal_client(calibrated: Path, tiny_checkpoint: Path, settings_for) -> AsyncIterator[object]:
    models = [str(calibrated), str(tiny_checkpoint)]
    async with serve(settings_for(models=models, default_model=calibrated.name)) as (_, client):
        yield client


def test_the_score_default_k_is_the_calibrations() -> None:
    assert ScoreRequest().k == DEFAULT_K


async def test_a_calibrated_model_answers_the_ood_fields(cal_client) -> None:
    inside = [png(digit_like(i)) for i in range(4)]
    noise = [png(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)) for i in range(4)]
    r = await cal_client.post("/v1/score", files=files(*inside, *noise), data={"k": "8"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["calibrated"] is True and body["fpr"] == 0.05 and "ood_note" not in body
    results = body["results"]
    scores = [s["ood_score"] for s in results]
    p_values = [s["p_value"] for s in results]
    assert all(0.0 <= p <= 1.0 for p in p_values)
    order = np.argsort(scores)  # p-values never rise as the score rises
    assert all(p_values[a] >= p_values[b] for a, b in zip(order, order[1:], strict=False))
    assert [s["is_anomaly"] for s in results] == [p <= 0.05 for p in p_values]
    assert np.mean(scores[4:]) > np.mean(scores[:4])  # noise is further out than images like the training data
    assert all(s["complexity_bits"] > 0 for s in results)


async def test_the_request_sets_the_false_positive_rate(cal_client) -> None:
    images = [png(digit_like(i)) for i in range(6)]
    loose = (await cal_client.post("/v1/score", files=files(*images), data={"k": "8", "fpr": "0.5"})).json()
    assert loose["fpr"] == 0.5
    assert [s["is_anomaly"] for s in loose["results"]] == [s["p_value"] <= 0.5 for s in loose["results"]]
    r = await cal_client.post("/v1/score", files=files(*images), data={"fpr": "0.001"})
    assert_error(r, 422, "invalid_input", "fpr=0.001", "below")
    assert_error(await cal_client.post("/v1/score", files=files(*images), data={"fpr": "1.5"}), 422, "invalid_request")


async def test_no_ood_score_without_calibration_or_on_grey_input(cal_client, tiny_checkpoint: Path) -> None:
    image = png(digit_like(0))
    plain = (await cal_client.post(f"/v1/score?model={tiny_checkpoint.name}", files=files(image))).json()
    assert plain["calibrated"] is False and "model.calibrate" in plain["ood_note"]
    assert "ood_score" not in plain["results"][0] and "log_likelihood" in plain["results"][0]
    grey = (await cal_client.post("/v1/score", files=files(image), data={"binarize": "false"})).json()
    assert grey["calibrated"] is False and "binarize=true" in grey["ood_note"]


async def test_models_say_whether_they_are_calibrated(cal_client, calibrated: Path, tiny_checkpoint: Path) -> None:
    listed = {m["name"]: m for m in (await cal_client.get("/v1/models")).json()["models"]}
    assert listed[calibrated.name]["calibrated"] is True
    assert listed[calibrated.name]["calibration"]["statistics"] == ["log_likelihood", "kl", "recon", "complexity_bits"]
    assert listed[tiny_checkpoint.name]["calibrated"] is False and listed[tiny_checkpoint.name]["calibration"] is None


async def test_a_corrupt_calibration_stops_the_start(calibrated: Path, tmp_path: Path, settings_for) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(calibrated, broken)
    data = bytearray((broken / "calibration.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "calibration.safetensors").write_bytes(bytes(data))
    from service.errors import StartupError

    with pytest.raises(StartupError, match="calibration"):
        async with serve(settings_for(models=[str(broken)], default_model="broken")):
            pass


async def test_the_v2_scorer_of_a_calibrated_model_answers_the_ood_outputs(cal_client, calibrated: Path) -> None:
    """The same numbers through the Open Inference Protocol: NAME-scorer's ood_score, p_value and is_anomaly."""
    images = [png(digit_like(i)) for i in range(3)]
    pixels = np.stack([digit_like(i) for i in range(3)])[:, None].astype(np.uint8)
    v1 = (await cal_client.post("/v1/score", files=files(*images), data={"k": "8", "fpr": "0.5"})).json()
    body = {
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
        ],
        "parameters": {"k": 8, "fpr": 0.5},
    }
    r = await cal_client.post(f"/v2/models/{calibrated.name}-scorer/infer", json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    for name in ("ood_score", "p_value"):
        np.testing.assert_allclose(outputs[name], [s[name] for s in v1["results"]], rtol=1e-5, atol=1e-5)
    assert outputs["is_anomaly"] == [float(s["is_anomaly"]) for s in v1["results"]]
