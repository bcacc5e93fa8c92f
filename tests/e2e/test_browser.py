"""The demo page at / in a real browser: Debian's Chromium, driven by Playwright for Python, against uvicorn on a
free loopback port serving two tiny checkpoints behind an API key.

Skips (with the reason) when Playwright or Chromium is missing: `.ci/browser.sh` installs both. Playwright's own
browser downloads are never used; the system Chromium is the executable.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("VAE_E2E_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
API_KEY = "e2e-secret"
KEY_STORAGE = "vae-serve.api-key"  # the page's sessionStorage key (service/static/app.js)
REPO = Path(__file__).resolve().parents[2]
# Generous: CI machines share their cores with training runs. On an idle machine the whole file takes ~30 s.
READY_TIMEOUT_S = 180
ACTION_TIMEOUT_MS = 60_000

# Skip the whole module (before any checkpoint is trained or server started) when the browser stack is missing.
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip(
        "Playwright for Python is not installed (pip install playwright, or run .ci/browser.sh)",
        allow_module_level=True,
    )
if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"Chromium not found at {CHROMIUM} (apt-get install chromium, or run .ci/browser.sh)", allow_module_level=True
    )

# In-page helper: the pixel range of an <img> (by selector), read back through a canvas.
PIXEL_RANGE = """(selector) => {
  const img = document.querySelector(selector);
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let min = 255, max = 0;
  for (let i = 0; i < data.length; i += 4) {
    for (let c = 0; c < 3; c++) { min = Math.min(min, data[i + c]); max = Math.max(max, data[i + c]); }
  }
  return {width: canvas.width, height: canvas.height, min, max};
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def calibrate_copy(source: Path, out: Path) -> None:
    """A copy of a tiny checkpoint with an OOD calibration (model.calibrate) on held-out images like its data."""
    import numpy as np
    import torch

    from model import checkpoint
    from model.calibrate import calibrate

    shutil.copytree(source, out)
    model, _ = checkpoint.load(out)
    rng = np.random.default_rng(100)
    images = np.zeros((60, 1, 8, 8), dtype=np.float32)
    for image in images:
        top, left = rng.integers(0, 4, size=2)
        image[0, top : top + 4, left : left + 4] = rng.integers(150, 256) / 255
    assert calibrate(model, torch.from_numpy(images), out, k=8, log=lambda _: None) is not None


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_checkpoint: Path,
    tiny_gaussian_checkpoint: Path,
    tiny_ae_checkpoint: Path,
) -> Iterator[str]:
    """uvicorn in a subprocess serving `tiny` (2-D latent, default), `tiny-rgb` (latent 3) and `tiny-ae` (a plain
    autoencoder of tiny's data and size) with an API key."""
    root = tmp_path_factory.mktemp("browser")
    models = root / "models"
    shutil.copytree(tiny_checkpoint, models / "tiny")
    shutil.copytree(tiny_gaussian_checkpoint, models / "tiny-rgb")
    shutil.copytree(tiny_ae_checkpoint, models / "tiny-ae")
    calibrate_copy(tiny_checkpoint, models / "tiny-cal")
    port = _free_port()
    env = {
        **os.environ,
        "VAE_MODELS_DIR": str(models),
        "VAE_DEFAULT_MODEL": "tiny",
        "VAE_API_KEY": API_KEY,
        "VAE_CPU_THREADS": "1",
        "VAE_DEVICE": "cpu",
    }
    log_path = root / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "service.main:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within {READY_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A fresh browser context on the page, with the console watched; `key` is pre-set in sessionStorage."""

    def __init__(self, browser: Any, base: str, key: str | None = API_KEY) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        if key is not None:
            self.context.add_init_script(f"sessionStorage.setItem({json.dumps(KEY_STORAGE)}, {json.dumps(key)})")
        self.page = self.context.new_page()
        self.page.set_default_timeout(ACTION_TIMEOUT_MS)
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.page.goto(base + "/")

    def ready(self) -> Any:
        """Wait until the models, the sample grid and the latent map have loaded."""
        self.page.wait_for_selector("#model-card[data-model]")
        self.page.wait_for_selector("#samples[data-state=done]")
        self.page.wait_for_selector("#map[data-state=done]")
        return self.page

    def draw(self, selector: str, points: list[tuple[float, float]]) -> None:
        """A mouse stroke through `points`, given as fractions of the element's box."""
        box = self.page.locator(selector).bounding_box()
        xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
        self.page.mouse.move(*xy[0])
        self.page.mouse.down()
        for x, y in xy[1:]:
            self.page.mouse.move(x, y, steps=4)
        self.page.mouse.up()

    def tiles(self, selector: str) -> list[str]:
        return self.page.eval_on_selector_all(f"{selector} img", "imgs => imgs.map(i => i.src)")

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def ui(browser: Any, server: str) -> Iterator[Page]:
    """One page shared by the tests that keep the default model: every page load decodes the whole latent map, which
    is slow on a busy machine. Each test only adds to the page's state (strokes, a seed), never relies on another's."""
    page = Page(browser, server)
    yield page
    page.close()


@pytest.fixture
def fresh_ui(browser: Any, server: str) -> Iterator[Page]:
    page = Page(browser, server)
    yield page
    page.close()


SEVEN = [(0.25, 0.22), (0.75, 0.22), (0.6, 0.5), (0.45, 0.8)]


def test_page_loads_draws_and_reconstructs(ui: Page, tmp_path: Path) -> None:
    page = ui.ready()
    assert "tiny" in page.text_content("#model-select")
    assert page.text_content("#card-dataset").startswith("folder")
    assert page.text_content("#card-latent") == "2"
    assert "nats" in page.text_content("#card-nll")

    ui.draw("#draw", SEVEN)
    page.click("#reconstruct")
    page.wait_for_selector("#analyze[data-state=done]")
    recon = page.evaluate(PIXEL_RANGE, "#recon-img")
    assert (recon["width"], recon["height"]) == (8, 8)  # the model's size
    assert recon["max"] > 10 and recon["max"] > recon["min"], f"blank reconstruction: {recon}"
    assert page.locator("#latent-chart .bar").count() == 2  # one bar per latent dimension
    assert page.get_attribute("#reading", "data-reading") in ("typical", "somewhat", "unusual")
    assert "nats" in page.text_content("#score-ll")
    assert "test NLL" in page.text_content("#reading-tip")

    page.screenshot(path=str(tmp_path / "demo-page.png"), full_page=True)
    assert (tmp_path / "demo-page.png").stat().st_size > 10_000
    assert ui.console_errors == []
    assert page.is_hidden("#global-error") and page.is_hidden("#analyze-error")


def test_sample_grid_follows_the_seed(ui: Page) -> None:
    page = ui.ready()
    assert page.get_attribute("#sample-grid", "data-seed") == "0"  # the page's default seed
    first = ui.tiles("#sample-grid")
    assert len(first) == 36

    def load(seed: str) -> list[str]:
        page.fill("#seed", seed)
        page.press("#seed", "Enter")
        page.wait_for_selector(f"#sample-grid[data-seed='{seed}']")
        page.wait_for_selector("#samples[data-state=done]")
        return ui.tiles("#sample-grid")

    other = load("1")
    assert other != first
    assert load("0") == first  # same seed, same images

    page.fill("#temperature", "0.5")  # a range input: fill sets the value and fires input/change
    page.wait_for_selector("#samples[data-state=done]")
    page.wait_for_function("document.querySelector('#samples-status').textContent.includes('0.50')")
    assert ui.tiles("#sample-grid") != first

    page.click("#new-samples")
    page.wait_for_function("document.querySelector('#sample-grid').dataset.seed !== '0'")

    page.focus("#sample-grid button.tile")  # keyboard: one tab stop, arrows move, Enter puts the sample on the canvas
    page.keyboard.press("ArrowDown")
    assert page.evaluate("[...document.querySelectorAll('#sample-grid button')].indexOf(document.activeElement)") == 6
    page.keyboard.press("Enter")
    page.wait_for_selector("#analyze[data-state=done]")
    assert page.evaluate(PIXEL_RANGE, "#recon-img")["width"] == 8
    assert ui.console_errors == []


def test_map_click_decodes_that_point(ui: Page, server: str) -> None:
    page = ui.ready()
    steps = int(page.input_value("#map-steps"))
    grid = httpx.get(
        f"{server}/v1/manifold", params={"model": "tiny", "steps": steps}, headers={"X-API-Key": API_KEY}, timeout=30
    ).json()
    # A click lands on whole CSS pixels: allow a quarter of the distance between neighbouring tiles.
    tolerance = 0.25 * 2 * min(grid["span"]) / (steps - 1)
    near = (
        "([z, tol]) => { const s = document.querySelector('#map-decoded').dataset.latent;"
        " return !!s && JSON.parse(s).every((v, i) => Math.abs(v - z[i]) < tol); }"
    )
    page.locator("#map-canvas").scroll_into_view_if_needed()
    box = page.locator("#map-canvas").bounding_box()
    for row, col in [(0, 0), (3, steps - 2), (steps - 1, 5)]:
        # the centre of tile (row, col) is the grid's code number row * steps + col
        page.mouse.click(box["x"] + (col + 0.5) * box["width"] / steps, box["y"] + (row + 0.5) * box["height"] / steps)
        page.wait_for_function(near, arg=[grid["latents"][row * steps + col], tolerance])
    assert page.evaluate(PIXEL_RANGE, "#map-decoded")["width"] == 8

    page.focus("#map-canvas")  # keyboard: arrows move over the tiles and decode their exact codes
    page.keyboard.press("ArrowRight")
    page.wait_for_function(near, arg=[grid["latents"][(steps - 1) * steps + 6], 1e-4])
    assert ui.console_errors == []


def test_interpolation_strip(ui: Page) -> None:
    page = ui.ready()
    ui.draw("#draw", SEVEN)
    page.click("#interp [data-pad=a] [data-action=copy]")
    page.click("#interpolate")
    assert "B" in page.text_content("#interp-status")  # asks for the missing image, sends nothing
    ui.draw("#pad-b", [(0.2, 0.2), (0.8, 0.8)])
    page.fill("#interp-steps", "6")
    page.click("#interpolate")
    page.wait_for_selector("#interp[data-state=done]")
    assert len(ui.tiles("#interp-strip")) == 6
    assert ui.console_errors == []


def test_upload(ui: Page) -> None:
    page = ui.ready()
    image = Image.new("L", (8, 8))
    image.paste(200, (2, 1, 6, 5))  # a bright square on black, like the tiny models' training images
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    page.set_input_files("#upload", files=[{"name": "square.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_selector("#analyze[data-state=done]")  # an upload is analysed straight away
    assert page.evaluate(PIXEL_RANGE, "#recon-img")["max"] > 10

    page.set_input_files("#upload", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a png"}])
    page.wait_for_selector("#analyze-error:not([hidden])")
    assert "cannot read notes.png as an image" in page.text_content("#analyze-error")
    assert ui.console_errors == []


def test_picker_switches_models(fresh_ui: Page) -> None:
    ui = fresh_ui
    page = ui.ready()
    assert page.input_value("#model-select") == "tiny"
    assert "grayscale" in page.text_content("#card-input")
    page.select_option("#model-select", "tiny-rgb")
    page.wait_for_selector("#model-card[data-model=tiny-rgb]")
    assert page.text_content("#card-latent") == "3"
    assert "3 channels" in page.text_content("#card-input")
    page.wait_for_function("document.querySelector('#sample-grid').getAttribute('aria-label').includes('tiny-rgb')")
    page.wait_for_selector("#map[data-state=done]")
    assert "principal" in page.text_content("#map-basis")  # latent 3: the card's principal directions

    ui.draw("#draw", SEVEN)
    page.click("#reconstruct")
    page.wait_for_selector("#analyze[data-state=done]")
    assert page.locator("#latent-chart .bar").count() == 3
    assert ui.console_errors == []


def test_api_errors_are_shown(browser: Any, server: str) -> None:
    ui = Page(browser, server, key=None)  # the server has a key; the page starts without one
    page = ui.page
    try:
        page.wait_for_selector("#global-error:not([hidden])")
        assert "needs an API key" in page.text_content("#global-error")
        assert "401" in page.text_content("#global-error")

        page.fill("#api-key", "wrong")
        page.click("#api-key-apply")
        page.wait_for_function("document.querySelector('#global-error').textContent.includes('wrong API key')")

        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Enter")
        ui.ready()
        assert page.is_hidden("#global-error")

        page.fill("#api-key", "wrong")  # not applied: but every call sends what the field holds
        page.click("#new-samples")
        page.wait_for_selector("#samples-error:not([hidden])")
        assert "wrong API key" in page.text_content("#samples-error")
        assert "GET /v1/sample" in page.text_content("#samples-error")
    finally:
        ui.close()


def test_ae_vs_vae_decodes_the_same_codes_side_by_side(ui: Page) -> None:
    page = ui.ready()
    assert page.eval_on_selector("#compare-pair", "s => [...s.options].map(o => o.value)") == ["tiny-ae|tiny"]
    page.fill("#compare-seed", "3")
    page.click("#compare-run")
    page.wait_for_selector("#compare[data-state=done]")
    for side in ("ae", "vae"):
        for what in ("samples", "map"):
            size = page.eval_on_selector(f"#compare-{side}-{what}", "img => [img.naturalWidth, img.naturalHeight]")
            assert size[0] > 8 and size[1] > 8, (side, what, size)
    assert "seed 3" in page.text_content("#compare-ae-caption")
    assert ui.console_errors == []


def test_a_calibrated_model_reads_typical_or_unusual_with_its_p_value(fresh_ui: Page) -> None:
    ui = fresh_ui
    page = ui.ready()
    page.select_option("#model-select", "tiny-cal")
    page.wait_for_selector("#model-card[data-model=tiny-cal]")
    ui.draw("#draw", SEVEN)
    page.click("#reconstruct")
    page.wait_for_selector("#analyze[data-state=done]")
    badge = page.text_content("#reading")
    assert page.get_attribute("#reading", "data-reading") in ("typical", "unusual")
    assert badge.startswith(("typical (p = ", "unusual (p = ")), badge
    p_value = float(page.text_content("#score-p"))
    assert 0.0 <= p_value <= 1.0
    assert "held-out images" in page.text_content("#reading-tip")
    assert ui.console_errors == []


def test_api_docs_render_with_no_network_beyond_the_server(browser: Any, server: str) -> None:
    """/docs (Swagger UI) and /redoc (ReDoc) render with every request to another host refused, as on an
    air-gapped machine: their scripts and styles come from the server itself."""
    context = browser.new_context()
    outside: list[str] = []

    def only_the_server(route: Any) -> None:
        if route.request.url.startswith(server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    page = context.new_page()
    page.set_default_timeout(ACTION_TIMEOUT_MS)
    try:
        page.goto(server + "/docs")
        page.wait_for_selector(".swagger-ui .opblock-summary-path")  # the operations, rendered from /openapi.json
        assert "/v1/encode" in page.text_content(".swagger-ui")
        page.goto(server + "/redoc")
        page.wait_for_selector("redoc h1, [role=main] h1, .api-content h1")
        assert "vae-serve" in page.text_content("body")
    finally:
        context.close()
    # All that was asked of another host (and refused): ReDoc's "API docs by Redocly" sidebar logo, decoration only.
    assert [url for url in outside if not url.startswith("https://cdn.redoc.ly/redoc/logo")] == [], outside
