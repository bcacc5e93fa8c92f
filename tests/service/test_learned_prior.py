"""A learned-prior checkpoint (flow and VampPrior) served for every verb: sample draws from the learned prior (seeded,
equal to the model's own VAE.sample with the same seed and temperature), score's log-likelihood uses its log p(z),
and encode, decode, reconstruct, interpolate and manifold keep their meaning."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from service_helpers import as_tensor, digit_like, files, png, serve
from tiny_models import make_tiny_checkpoint

from model import checkpoint, losses
from model.vae import VAE

pytestmark = pytest.mark.anyio

PRIORS = {
    "flow": ("--prior", "flow", "--flow-layers", "2", "--flow-hidden", "8"),
    "vamp": ("--prior", "vamp", "--vamp-components", "4"),
}


@pytest.fixture(scope="module", params=list(PRIORS))
def learned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"prior-{request.param}")
    return make_tiny_checkpoint(root, f"tiny-{request.param}", *PRIORS[request.param])


@pytest.fixture(scope="module")
async def learned_client(learned: Path, settings_for) -> AsyncIterator[tuple[str, VAE, object]]:
    model, _ = checkpoint.load(learned)
    async with serve(settings_for(models=[str(learned)], default_model=learned.name)) as (_, client):
        yield learned.name, model, client


async def test_sample_draws_from_the_learned_prior(learned_client) -> None:
    name, model, client = learned_client
    assert model.config.prior != "standard"
    r = await client.get("/v1/sample?n=5&seed=7&temperature=0.8&encoding=pixels")
    assert r.status_code == 200, r.text
    body = r.json()
    expected = model.sample(5, temperature=0.8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.tensor(body["pixels"]), expected, atol=1e-5, rtol=1e-5)
    z = model.prior.transform(model.prior.noise(5, torch.Generator().manual_seed(7)), 0.8)
    torch.testing.assert_close(torch.tensor(body["latents"]), z, atol=1e-5, rtol=1e-5)
    again = await client.get("/v1/sample?n=5&seed=7&temperature=0.8&encoding=pixels")
    assert again.json() == body  # seeded


async def test_score_uses_the_learned_log_prior(learned_client) -> None:
    name, model, client = learned_client
    images = [digit_like(i) for i in range(3)]
    r = await client.post("/v1/score", files=files(*(png(a) for a in images)), data={"k": "16", "seed": "2"})
    assert r.status_code == 200, r.text
    g = torch.Generator().manual_seed(2)
    x = torch.bernoulli(as_tensor(images), generator=g)
    losses.elbo(model, x, generator=g)  # the service draws the ELBO's sample first, from the same generator
    ll = losses.iwae_log_likelihood(model, x, k=16, generator=g)
    got = torch.tensor([res["log_likelihood"] for res in r.json()["results"]])
    torch.testing.assert_close(got, ll, atol=1e-4, rtol=1e-5)


async def test_every_other_verb_answers(learned_client) -> None:
    name, model, client = learned_client
    a, b = png(digit_like(1)), png(digit_like(2))
    encoded = await client.post("/v1/encode", files=files(a))
    assert encoded.status_code == 200 and len(encoded.json()["results"][0]["mu"]) == model.config.latent_dim
    decoded = await client.post("/v1/decode", json={"latents": [[0.0] * model.config.latent_dim]})
    assert decoded.status_code == 200 and len(decoded.json()["images"]) == 1
    assert (await client.post("/v1/reconstruct", files=files(a))).status_code == 200
    strip = await client.post("/v1/interpolate", files=files(a, b), data={"steps": "4"})
    assert strip.status_code == 200 and len(strip.json()["latents"]) == 4
    # A 2-D learned prior is not centred on the standard normal's plane: the map uses the training codes' plane.
    manifold = await client.get("/v1/manifold?steps=3")
    assert manifold.status_code == 200 and manifold.json()["basis"] == "principal_directions"
    card = (await client.get(f"/v1/models/{name}")).json()
    assert card["architecture"]["prior"] == model.config.prior
