"""Schemathesis over the service's own OpenAPI schema: every operation, a bounded and seeded set of generated
requests (schema-valid and schema-violating), in-process. No 5xx, every response (status, content type, headers,
body) matches the schema, schema-violating requests are refused with a 4xx, and no body carries a traceback.

Not checked: "schema-valid data is accepted". The schema cannot say what only the loaded model knows (a latent's
length, `manifold` wanting a 2-D model or a card with principal directions, `interpolate` wanting exactly two ends),
so such requests get the documented 422 `invalid_input` / 406 `not_acceptable` by design.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from service_helpers import assert_error, b64, digit_like, files, png

from service.main import create_app

EXAMPLES = 20  # per operation, in the fuzzing phase; the examples and coverage phases add their own
CONFIG = {
    "seed": 0,
    "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
    "checks": {"positive_data_acceptance": {"enabled": False}},
}
TRACEBACK_MARKERS = (b"Traceback (most recent call last)", b'File "/', b"site-packages")
cases_run: Counter[str] = Counter()


@pytest.fixture(scope="module")
def api_schema(settings_for) -> Iterator[schemathesis.BaseSchema]:
    app = create_app(settings_for())
    # Schemathesis runs the app's lifespan itself (on its own event loop) and keeps it up until told to stop.
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(CONFIG))
    asgi.shutdown_lifespans()


def no_traceback(ctx, response, case) -> None:
    leaked = [marker for marker in TRACEBACK_MARKERS if marker in response.content]
    assert not leaked, f"the response body leaks server internals: {leaked}"


@schemathesis.hook
def flatmap_path_parameters(ctx, path_parameters):
    """A v2 path names a model, and a random name is a 404 before the body is read: 3 cases in 4 name a served one."""
    if not path_parameters or "model_name" not in path_parameters:
        return st.just(path_parameters)
    served = {"model_name": st.sampled_from(["tiny-encoder", "tiny-decoder", "tiny-scorer", "tiny-rgb-encoder"])}
    if "model_version" in path_parameters:
        served["model_version"] = st.sampled_from(["1", path_parameters["model_version"]])
    named = st.fixed_dictionaries(served)
    return st.one_of(st.just(path_parameters), named, named, named)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_api(case) -> None:
    cases_run[case.operation.label] += 1
    case.call_and_validate(additional_checks=[no_traceback])


def test_every_operation_was_fuzzed(api_schema) -> None:
    operations = {result.ok().label for result in api_schema.get_all_operations()}
    assert set(cases_run) == operations
    assert min(cases_run.values()) >= 5, cases_run
    # The Open Inference Protocol's routes are in the schema, so in the run: JSON and binary bodies, and the header.
    assert {"GET /v2", "GET /v2/models/{model_name}", "POST /v2/models/{model_name}/infer"} <= set(cases_run)
    print(f"\nfuzz cases: {sum(cases_run.values())} over {len(cases_run)} operations: {dict(cases_run)}")


# -- what the fuzzer found, pinned -----------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_json_bodies_are_typed_strictly(client) -> None:
    """JSON says what type a value is: `"seed": false` or `"k": "5"` is a 422 (lax parsing took them as 0 and 5).
    Form fields are text, so multipart uploads still send numbers as strings."""
    image = b64(png(digit_like(0)))
    r = await client.post("/v1/encode", json={"images": [image], "sample": True, "seed": False})
    assert_error(r, 422, "invalid_request", "seed")
    assert_error(await client.post("/v1/score", json={"images": [image], "k": "5"}), 422, "invalid_request", "k")
    r = await client.post("/v1/encode", files=files(png(digit_like(0))), data={"sample": "true", "seed": "5"})
    assert r.status_code == 200 and r.json()["seed"] == 5


@pytest.mark.anyio
async def test_latents_that_overflow_float32_are_refused(client) -> None:
    """temperature * N(0, I) overflowed float32 to infinity, and the answer held nulls where numbers belong."""
    r = await client.get("/v1/sample?temperature=1.3e308&encoding=pixels")
    assert_error(r, 422, "invalid_input", "too large")
