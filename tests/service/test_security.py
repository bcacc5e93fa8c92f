"""Security properties that the code, not a deployment, guarantees: no pickle anywhere (safetensors only), the
container's user is not root, CORS off unless configured, and no server internals in error bodies. (The API key's
behaviour and the request size limits: tests/service/test_errors.py; the fuzzer checks every body for tracebacks.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from service_helpers import assert_error, serve

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
# Modules and calls that deserialise pickles (torch.load and numpy.load included: both unpickle by default or on
# request). Checkpoints are safetensors, read by model.checkpoint alone.
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
PICKLE_CALLS = {("torch", "load"), ("torch.jit", "load"), ("np", "load"), ("numpy", "load"), ("pd", "read_pickle")}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def pickle_uses(source: str) -> list[str]:
    """`line: name` for each import of a pickle module and each reference to an unpickling loader."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad = [alias.name for alias in node.names if alias.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            bad = [node.module] if (node.module or "").split(".")[0] in PICKLE_MODULES else []
        elif isinstance(node, ast.Attribute):
            bad = [f"{dotted(node.value)}.{node.attr}"] if (dotted(node.value), node.attr) in PICKLE_CALLS else []
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in bad]
    return found


def test_the_pickle_detector_detects() -> None:
    source = "import pickle\nfrom joblib import load\nimport torch\nm = torch.load('x.pt')\nz = numpy.load('a')\n"
    assert pickle_uses(source) == ["1: pickle", "2: joblib", "4: torch.load", "5: numpy.load"]


def test_no_pickle_anywhere() -> None:
    found = [
        f"{path.relative_to(REPO)}:{use}"
        for package in ("model", "service")
        for path in sorted((REPO / package).rglob("*.py"))
        for use in pickle_uses(path.read_text())
    ]
    assert found == []
    shipped = [
        p.relative_to(REPO)
        for p in (REPO / "checkpoints").rglob("*")
        if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".npy")
    ]
    assert shipped == []


def test_the_container_runs_as_a_non_root_user() -> None:
    """The runtime stage (the image's default target, the last stage) switches to a numeric non-root uid."""
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    stages = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    assert lines[stages[-1]].endswith("AS runtime")
    users = [line.split()[1] for line in lines[stages[-1] :] if line.upper().startswith("USER ")]
    assert users, "the runtime stage never sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]


@pytest.mark.anyio
async def test_cors_is_off_by_default(client) -> None:
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    preflight = await client.options("/v1/decode", headers=headers)
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 405
    r = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.anyio
async def test_cors_when_configured(settings_for) -> None:
    app_origin = "https://app.example"
    async with serve(settings_for(cors_origins=[app_origin], api_key="s3cret")) as (_, client):
        # The preflight carries no key and must not need one; the key header must be allowed.
        ask = {
            "Origin": app_origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-api-key",
        }
        r = await client.options("/v1/decode", headers=ask)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == app_origin
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        r = await client.options("/v1/decode", headers={**ask, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        # Answers, errors included, carry the header, so the page can read them.
        r = await client.post(
            "/v1/decode", json={"latents": [[0, 0]]}, headers={"Origin": app_origin, "X-API-Key": "s3cret"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app_origin
        r = await client.post("/v1/decode", json={"latents": [[0, 0]]}, headers={"Origin": app_origin})
        assert_error(r, 401, "unauthorized")
        assert r.headers["access-control-allow-origin"] == app_origin
        r = await client.get("/v1/models", headers={"Origin": "https://evil.example", "X-API-Key": "s3cret"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_origins_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("VAE_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings().cors_origins == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("VAE_CORS_ORIGINS", "")
    assert Settings().cors_origins is None


@pytest.mark.anyio
async def test_no_internals_in_a_500(served, monkeypatch) -> None:
    """An unexpected exception deep in a forward pass: the client sees a generic body, not the message, the
    exception type, a file path or a traceback."""
    app, client = served
    served_model = app.state.registry.models["tiny"]

    def explode(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError(f"secret at {REPO}/service/predictor.py")

    monkeypatch.setattr(served_model.batcher, "_forward", explode)
    r = await client.post("/v1/decode", json={"latents": [[0, 0]]})
    assert_error(r, 500, "internal_error")
    for leak in ("secret", "ZeroDivisionError", "Traceback", str(REPO), ".py"):
        assert leak not in r.text
