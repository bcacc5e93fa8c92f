"""Settings from flags and VAE_ variables, `python -m service`, model discovery, and the dependency direction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service import __main__ as cli
from service.errors import StartupError
from service.registry import discover
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
    assert s.models_dir == Path("checkpoints") and s.default_model == "mnist" and s.device == "auto"
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


def test_discovery(models_dir, tiny_checkpoint) -> None:
    found = discover(Settings(models_dir=models_dir, default_model="tiny"))
    assert sorted(found) == ["tiny", "tiny-ae", "tiny-rgb"]  # not-a-checkpoint/ has no card and is skipped
    chosen = discover(Settings(models_dir=models_dir, models=["tiny-rgb", str(tiny_checkpoint)], default_model=None))
    assert list(chosen) == ["tiny-rgb", "tiny"] and chosen["tiny"] == tiny_checkpoint
    with pytest.raises(StartupError, match="not a checkpoint directory"):
        discover(Settings(models_dir=models_dir, models=["not-a-checkpoint"], default_model=None))
    with pytest.raises(StartupError, match="two models are named 'tiny'"):
        discover(Settings(models_dir=models_dir, models=["tiny", str(tiny_checkpoint)], default_model=None))


def test_dependency_direction() -> None:
    """service uses only model's inference surface; the client and `import service` load neither torch nor FastAPI;
    model never imports service or web libraries."""
    code = """
import sys
import service, service.client
assert "torch" not in sys.modules and "fastapi" not in sys.modules, "service/client import torch or fastapi"
import service.main
for name in ("model.train", "model.data", "model.metrics", "model.report", "model.distributed"):
    assert name not in sys.modules, name
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "starlette", "pydantic", "service", "uvicorn"):
            raise ImportError("blocked " + name)
for key in [k for k in sys.modules if k.split(".")[0] in ("model", "fastapi", "starlette", "pydantic", "service")]:
    del sys.modules[key]
sys.meta_path.insert(0, Block())
import model.vae, model.checkpoint, model.losses, model.preprocess, model.latent
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imports = set()
    for path in (REPO / "service").rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["from"] and words[1].startswith("model"):
                imports.add(words[1] + (("." + words[3].rstrip(",")) if words[1] == "model" else ""))
            elif words[:1] == ["import"] and words[1].startswith("model"):
                imports.add(words[1])
    allowed = {f"model.{m}" for m in ("vae", "checkpoint", "losses", "preprocess", "latent")}
    used = {i if i.count(".") == 1 else ".".join(i.split(".")[:2]) for i in imports}
    assert used <= allowed, used - allowed
