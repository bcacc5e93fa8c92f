"""Helpers for the Open Inference Protocol (v2) tests (imported by name: the test folders are not packages)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
from service_helpers import digit_like

HEADER = "Inference-Header-Content-Length"
NUMPY = {"UINT8": np.uint8, "FP32": np.float32}


def images_uint8(n: int, size: tuple[int, int] = (8, 8), channels: int = 1, seed: int = 0) -> np.ndarray:
    """n digit-like uint8 images, (N, C, H, W)."""
    arrays = [digit_like(seed + i, size, channels) for i in range(n)]
    stacked = np.stack(arrays)
    return stacked[:, None] if channels == 1 else stacked.transpose(0, 3, 1, 2).copy()


def binary_request(
    inputs: dict[str, tuple[np.ndarray, str]],
    outputs: list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    request_id: str | None = None,
    binary_outputs: bool = True,
) -> tuple[bytes, dict[str, str]]:
    """A request with binary inputs (and outputs asked for as binary data): its body and headers."""
    header: dict[str, Any] = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": dt, "parameters": {"binary_data_size": a.nbytes}}
            for n, (a, dt) in inputs.items()
        ]
    }
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    if outputs is not None:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": binary_outputs}} for o in outputs]
    else:
        header.setdefault("parameters", {})["binary_data_output"] = binary_outputs
    head = json.dumps(header).encode()
    body = head + b"".join(np.ascontiguousarray(a).tobytes() for a, _ in inputs.values())
    return body, {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def json_request(
    inputs: dict[str, tuple[np.ndarray, str]], parameters: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": dt, "data": a.reshape(-1).tolist()}
            for n, (a, dt) in inputs.items()
        ],
        **extra,
    }
    if parameters:
        body["parameters"] = parameters
    return body


def outputs_of(response: httpx.Response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An inference response (JSON, or JSON header + binary outputs) -> (its JSON, its outputs as arrays)."""
    assert response.status_code == 200, response.text
    content = response.content
    length = int(response.headers.get(HEADER, len(content)))
    answer = json.loads(content[:length])
    arrays, offset = {}, length
    for out in answer["outputs"]:
        dtype = NUMPY[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.array(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            arrays[out["name"]] = np.frombuffer(content[offset : offset + size], dtype=dtype).reshape(out["shape"])
            offset += size
    assert offset == len(content)
    return answer, arrays


def assert_v2_error(response: httpx.Response, status: int, *fragments: str) -> str:
    """The v2 error shape: exactly {"error": str}, JSON content type."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = json.loads(response.content)
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    for fragment in fragments:
        assert fragment in body["error"], body
    return str(body["error"])
