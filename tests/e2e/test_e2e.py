"""End to end over real HTTP: `python -m service` (uvicorn) in a subprocess on a free loopback port with a tiny
checkpoint; the package's own client talks to it; then the server is stopped and must exit cleanly."""

from __future__ import annotations

import io
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import free_port, models_dir, start_server, wait_ready
from PIL import Image

from service.client import VAEClient, VAEServiceError

pytestmark = pytest.mark.e2e


def test_e2e(tmp_path: Path, tiny_checkpoint: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    server = start_server(models_dir(tmp_path, tiny_checkpoint), port, log)
    try:
        wait_ready(server, port, log)
        with VAEClient(f"http://127.0.0.1:{port}", timeout=10) as vae:
            assert vae.ready()
            # A real PNG of another size and mode (RGB 20x12) is converted the way training did.
            rgb = np.zeros((12, 20, 3), dtype=np.uint8)
            rgb[2:8, 4:14] = (200, 220, 180)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            path = tmp_path / "upload.png"
            path.write_bytes(buf.getvalue())
            encoded = vae.encode([path], sample=True, seed=1)
            assert encoded["model"] == "tiny" and encoded["latent_dim"] == 2
            result = encoded["results"][0]
            assert len(result["mu"]) == len(result["logvar"]) == len(result["z"]) == 2
            assert vae.encode([path], sample=True, seed=1) == encoded

            grid = vae.sample(9, seed=3, format="png")
            image = Image.open(io.BytesIO(grid))
            image.load()
            assert image.format == "PNG" and image.size == (3 * 10 + 2, 3 * 10 + 2)  # 3x3 tiles of 8 px, 2 px gaps
            assert vae.sample(9, seed=3, format="png") == grid

            assert vae.models()["default"] == "tiny"
            with pytest.raises(VAEServiceError) as info:
                vae.decode([[0.0, 0.0, 0.0]])
            assert info.value.status == 422 and info.value.code == "invalid_input"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, log.read_text()
    assert "Application shutdown complete" in log.read_text()
