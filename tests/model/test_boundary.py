import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_model_package_imports_without_any_web_dependency():
    """`model/` must work in a bare training environment: block fastapi, pydantic, starlette and service."""
    code = (
        "import sys\n"
        "for name in ('fastapi', 'pydantic', 'starlette', 'uvicorn', 'service'): sys.modules[name] = None\n"
        "import model.vae, model.losses, model.checkpoint, model.data, model.train, model.evaluate, model.metrics\n"
        "import model.latent, model.preprocess, model.report, model.download, model.distributed\n"
        "import model.anomaly, model.calibrate\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_no_pickle_based_loading_in_the_code():
    offenders = []
    for path in [*ROOT.glob("model/**/*.py"), *ROOT.glob("service/**/*.py")]:
        text = path.read_text()
        if "torch.load(" in text or "import pickle" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
