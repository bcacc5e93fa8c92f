import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The training side: dataset readers, the training loop and its figures, the evaluation CLI and the experiments.
# The service imports only the inference surface (the VAE, its likelihoods, the checkpoint loader, preprocessing).
TRAINING_ONLY = (
    "model.train",
    "model.data",
    "model.report",
    "model.evaluate",
    "model.download",
    "model.calibrate",
    "experiments",
)


def test_model_package_imports_without_any_web_dependency():
    """`model/` must work in a bare training environment: block fastapi, pydantic, starlette and service."""
    code = (
        "import sys\n"
        "for name in ('fastapi', 'pydantic', 'starlette', 'uvicorn', 'service'): sys.modules[name] = None\n"
        "import model.vae, model.priors, model.losses, model.checkpoint, model.data, model.train, model.evaluate\n"
        "import model.metrics, model.latent, model.preprocess, model.report, model.download, model.distributed\n"
        "import model.device, model.anomaly, model.calibrate\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_service_never_imports_the_training_side_or_the_experiments():
    """Every service module imports with the training loop, dataset readers and experiments blocked."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "service").rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for name in {TRAINING_ONLY!r}: sys.modules[name] = None\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_pickle_based_loading_in_the_code():
    offenders = []
    for path in [*ROOT.glob("model/**/*.py"), *ROOT.glob("service/**/*.py")]:
        text = path.read_text()
        if "torch.load(" in text or "import pickle" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
