"""Settings from flags and VAE_ variables, `python -m service`, model discovery, and the dependency direction."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import serve

from service import __main__ as cli
from service.errors import StartupError
from service.registry import default_name, discover
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_environment_and_flags(monkeypatch) -> None:
    monkeypatch.setenv("VAE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("VAE_MODELS", "mnist, frey-face")
    monkeypatch.setenv("VAE_API_KEY", "k")
    s = cli.parse_settings(["--port", "9000", "--no-batching", "--max-wait-ms", "2.5", "--device", "cpu"])
    assert (s.port, s.batching, s.max_wait_ms, s.max_batch_size) == (9000, False, 2.5, 16)
    assert s.models == ["mnist", "frey-face"] and s.api_key is not None and s.api_key.get_secret_value() == "k"
    s = cli.parse_settings(["--max-batch-size", "8", "--models", "a", "b", "--api-key", "x"])
    assert s.max_batch_size == 8 and s.models == ["a", "b"] and s.api_key.get_secret_value() == "x"


def test_defaults_are_documented_and_relative() -> None:
    s = Settings()
    assert s.models_dir == Path("checkpoints") and s.default_model is None and s.device == "auto"
    assert s.max_wait_ms == 0 and s.api_key is None and s.host == "127.0.0.1"


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--device", "tpu"], ["--dtype", "int8"]])
def test_bad_settings_exit_with_a_message(argv, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_settings(argv)
    message = str(info.value) + capsys.readouterr().err
    assert "error" in message and ("max_batch_size" in message or "device" in message or "dtype" in message)


def test_main_runs_uvicorn_with_the_settings(monkeypatch, models_dir) -> None:
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    cli.main(["--models-dir", str(models_dir), "--default-model", "tiny", "--host", "0.0.0.0", "--port", "1234"])
    assert seen["host"] == "0.0.0.0" and seen["port"] == 1234 and seen["access_log"] is True
    assert seen["app"].state.settings.default_model == "tiny"
    assert seen["limit_concurrency"] is None  # no connection cap unless asked for
    cli.main(["--models-dir", str(models_dir), "--default-model", "tiny", "--max-connections", "500"])
    assert seen["limit_concurrency"] == 500


def test_discovery(models_dir, tiny_checkpoint) -> None:
    found = discover(Settings(models_dir=models_dir, default_model="tiny"))
    assert sorted(found) == ["tiny", "tiny-ae", "tiny-rgb"]  # not-a-checkpoint/ has no card and is skipped
    chosen = discover(Settings(models_dir=models_dir, models=["tiny-rgb", str(tiny_checkpoint)], default_model=None))
    assert list(chosen) == ["tiny-rgb", "tiny"] and chosen["tiny"] == tiny_checkpoint
    with pytest.raises(StartupError, match="not a checkpoint directory"):
        discover(Settings(models_dir=models_dir, models=["not-a-checkpoint"], default_model=None))
    with pytest.raises(StartupError, match="two models are named 'tiny'"):
        discover(Settings(models_dir=models_dir, models=["tiny", str(tiny_checkpoint)], default_model=None))


def test_the_default_model_without_a_setting() -> None:
    """The only model served; else the bundled default `mnist` when served; else the first name alphabetically."""
    assert default_name(["tiny"]) == "tiny"
    assert default_name(["zeta", "mnist", "alpha"]) == "mnist"
    assert default_name(["zeta", "alpha"]) == "alpha"


@pytest.mark.anyio
async def test_a_one_model_server_starts_with_that_model_as_default(tiny_checkpoint) -> None:
    """`python -m service --models path/to/tiny` with no --default-model: `tiny` answers requests naming none."""
    async with serve(Settings(models=[str(tiny_checkpoint)], cpu_threads=1, grpc=False)) as (_, client):
        assert (await client.get("/v1/models")).json()["default"] == tiny_checkpoint.name
        r = await client.post("/v1/decode", json={"latents": [[0.0, 0.0]]})
        assert r.status_code == 200 and r.json()["model"] == tiny_checkpoint.name


def test_dependency_direction() -> None:
    """service imports only model's inference surface (vae, priors, checkpoint, losses, preprocess, latent, anomaly,
    device), never the training loop or dataset readers; `import service` and the client load neither torch nor
    FastAPI. (That model never imports service is tests/model/test_boundary.py's job.)"""
    code = "import sys, service, service.client; assert not {'torch', 'fastapi'} & set(sys.modules), sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    used = set()
    for path in (REPO / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "model":
                names = [node.module] if node.module != "model" else [f"model.{a.name}" for a in node.names]
                used.update(".".join(n.split(".")[:2]) for n in names)
            elif isinstance(node, ast.Import):
                used.update(".".join(a.name.split(".")[:2]) for a in node.names if a.name.split(".")[0] == "model")
    allowed = {
        f"model.{m}" for m in ("vae", "priors", "checkpoint", "losses", "preprocess", "latent", "device", "anomaly")
    }
    assert used and used <= allowed, used - allowed
