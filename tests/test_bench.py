"""Smoke tests of the benchmark scripts: the load generator against a tiny in-process server for a fraction of a
second, the in-process table on the tiny checkpoint, the serving report on made-up figures. No timing is asserted:
speed targets live in the benchmarks (docs/benchmarks.md), not in tests."""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import time
from pathlib import Path

import pytest

from bench import ab, inprocess, loadgen, serving, swaps, threads


async def tiny_http_server(answer: bytes) -> tuple[asyncio.Server, int]:
    """Answers every request on a keep-alive connection with `answer` (the request is read up to its blank line
    and Content-Length)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, loadgen.HOST, 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),  # unsupported: an error
    ],
)
def test_load_generator_counts_answers_and_errors(answer: bytes, ok: bool) -> None:
    async def main() -> loadgen.Result:
        server, port = await tiny_http_server(answer)
        async with server:
            request = loadgen.multipart_request(port, "/v1/encode", [loadgen.digit_png((8, 8))], fields={"seed": "1"})
            return await loadgen.load(port, request, clients=4, max_requests=200, duration=0.5)

    result = asyncio.run(main())
    assert result.requests + result.errors > 0 and result.clients == 4
    if ok:
        assert result.errors == 0 and 0 < result.requests <= 200 and result.statuses == {200: result.requests}
        assert 0 < result.percentile(50) <= result.percentile(99) and result.rps > 0
    else:
        assert result.errors > 0 and result.rps == 0


def test_inprocess_table_on_the_tiny_checkpoint(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inprocess.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--seconds",
            "0.001",
            "--rounds",
            "1",
            "--batches",
            "1",
            "4",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    for row in (
        "| encode forward | 4 |",
        "| decode forward | 1 |",
        "| reconstruct forward | 4 |",
        "| sample: prior noise -> z -> image | 4 |",
        "| multipart body -> parts | 4 |",
        "| PNG upload -> input tensor | 4 |",
        "| encode output -> JSON answer | 1 |",
        "| uint8 tensor body -> input tensor | 4 |",
        "| encode output -> tensor answer | 4 |",
        "| output -> base64 PNG | 1 |",
        "| bulk encode: PNGs",
        "| bulk encode: uint8 tensor -> input -> forward | 4 |",
    ):
        assert row in out


def test_cuda_absent_skips_cleanly(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    inprocess.main(["--checkpoint", str(tiny_checkpoint), "--device", "cuda"])
    serving.main(["--checkpoint", str(tiny_checkpoint), "--device", "cuda"])
    assert capsys.readouterr().out.count("skipped: --device cuda") == 2


def test_serving_report_and_targets_from_figures() -> None:
    def result(rps: float, latency_ms: float, clients: int) -> loadgen.Result:
        n = int(rps)
        return loadgen.Result(clients, [latency_ms / 1000] * n, 0, 1.0, {200: n})

    figures = {
        ("encode", 64, "ours"): (3000, 20),
        ("encode", 64, "plain"): (1000, 60),
        ("encode", 64, "litserve"): (2000, 30),
        ("healthz", 64, "ours"): (5000, 10),
        ("encode", 1, "ours"): (900, 1.1),
        ("encode", 1, "plain"): (1000, 1.0),
        ("bulk encode", 1, "ours"): (10, 100),
    }
    cells = {key: serving.Cell([result(rps, ms, key[1])], [100.0]) for key, (rps, ms) in figures.items()}
    table = serving.report(cells, bulk_images=256)
    assert "| encode | 64 | ours | 3000 | 0 | 3,000 |" in table and "(2,560 img/s)" in table
    lines = serving.targets(cells, limit_images_per_s=3200, bulk_images=256)
    assert any("vs plain FastAPI: 3.00x" in line and "(target >= 3x: met)" in line for line in lines)
    assert any("vs LitServe: 1.50x" in line and "(target >= 2x: missed)" in line for line in lines)
    assert any("/healthz: 60%" in line and "missed" in line for line in lines)
    one_client = "encode at 1 client, p50 ours vs plain: 1.10 vs 1.00 ms = 1.10x (target <= 1x: missed)"
    assert one_client in lines
    assert sum("encode at 64 clients, ours vs plain" in line for line in lines) == 1
    assert any("2,560 images/s = 80%" in line and "met" in line for line in lines)


def test_load_generator_rotates_a_pool_of_requests_and_shows_each_answer() -> None:
    """A client sends the pool's entries in turn (client n of N: n, n + N, ...) and on_answer gets each answer."""
    seen: list[tuple[int, int, bytes]] = []

    async def main() -> loadgen.Result:
        server, port = await tiny_http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Model-Version: 3\r\n\r\nok")
        async with server:
            pool = [loadgen.get_request(port, f"/{i}") for i in range(5)]
            on_answer = lambda i, status, head, body, sent, latency: seen.append((i, status, body))  # noqa: E731
            return await loadgen.load(port, pool, clients=1, max_requests=8, duration=5.0, on_answer=on_answer)

    result = asyncio.run(main())
    assert result.requests == len(seen) == 8 and {(status, body) for _, status, body in seen} == {(200, b"ok")}
    assert [i for i, _, _ in seen] == [0, 1, 2, 3, 4, 0, 1, 2]  # one client: every entry in turn, wrapping
    assert swaps.header(b"HTTP/1.1 200 OK\r\nX-Model-Version: 3", b"x-model-version") == "3"


@pytest.mark.e2e
def test_swaps_under_load_on_two_tiny_versions(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/swaps.py for a second: versions alternate the tiny model and a copy with other weights."""
    import torch

    from model import checkpoint

    model, card = checkpoint.load(tiny_checkpoint)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    checkpoint.save(model, card, tmp_path / "tiny-b")
    argv = ["--first", str(tiny_checkpoint), "--second", str(tmp_path / "tiny-b"), "--duration", "1.5"]
    code = swaps.main([*argv, "--every", "0.5", "--clients", "4", "--pool", "6", "--cycles", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| reload every 0.5 s |" in out and "after unload" in out and "FAIL" not in out


def test_binary_cells_requests_and_targets() -> None:
    """The binary path's cells: ours only, a raw uint8 tensor request per protocol builder, and its targets against
    the PNG cell and the in-process limits."""
    args = argparse.Namespace(clients=[1, 64], binary=["v1 tensor"], binary_clients=[64], bulk_clients=[1])
    plan = serving.plan(args)
    assert ("encode v1 tensor", 64) in plan and ("bulk encode v1 tensor", 1) in plan and ("encode", 1) in plan
    assert serving.runs_on("encode v1 tensor", "ours") and not serving.runs_on("encode v1 tensor", "plain")
    assert not serving.runs_on("bulk encode v1 tensor", "ours-baseline") and serving.runs_on("encode", "litserve")
    pixels = loadgen.digit_pixels((8, 8))
    requests = serving.binary_requests(1234, pixels, bulk_images=3, model="tiny")
    single, bulk = requests["encode v1 tensor"], requests["bulk encode v1 tensor"]
    assert single.startswith(b"POST /v1/encode?shape=1,1,8,8&dtype=uint8 HTTP/1.1\r\n")
    assert b"Content-Type: application/octet-stream\r\n" in single and b"Accept: application/octet-stream" in single
    assert single.endswith(b"\r\n\r\n" + pixels.tobytes()) and b"Content-Length: 64\r\n" in single
    assert b"shape=3,1,8,8" in bulk and bulk.endswith(pixels.tobytes() * 3)
    v2 = requests["bulk encode v2 binary"]
    assert v2.startswith(b"POST /v2/models/tiny-encoder/infer HTTP/1.1\r\n") and v2.endswith(pixels.tobytes() * 3)
    head_length = int(v2.split(b"Inference-Header-Content-Length: ")[1].split(b"\r\n")[0])
    header = json.loads(v2.split(b"\r\n\r\n", 1)[1][:head_length])
    assert header["inputs"] == [
        {"name": "images", "shape": [3, 1, 8, 8], "datatype": "UINT8", "parameters": {"binary_data_size": 192}}
    ]

    def result(rps: float, latency_ms: float, clients: int) -> loadgen.Result:
        return loadgen.Result(clients, [latency_ms / 1000] * int(rps), 0, 1.0, {200: int(rps)})

    figures = {
        ("encode", 64, "ours"): (3000, 20),
        ("encode v1 tensor", 64, "ours"): (3300, 18),
        ("bulk encode v1 tensor", 1, "ours"): (50, 20),
    }
    cells = {key: serving.Cell([result(rps, ms, key[1])], [100.0]) for key, (rps, ms) in figures.items()}
    table = serving.report(cells, bulk_images=256)
    assert "| bulk encode v1 tensor | 1 | ours | 50 | 0 | 50.0 (12,800 img/s) |" in table
    lines = serving.targets(cells, limit_images_per_s=25600, bulk_images=256, tensor_limit_images_per_s=16000)
    assert any("v1 tensor vs the PNG upload: 3,300 vs 3,000 req/s = 1.10x" in line and "met" in line for line in lines)
    assert any("12,800 images/s = 80% of the uint8 tensor in-process limit 16,000; 50% of the PNG" in line
               and "(target >= 80% of the first: met)" in line for line in lines)  # fmt: skip


@pytest.mark.e2e
def test_threads_table_of_a_real_server(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads.main(
        ["--checkpoint", str(tiny_checkpoint), "--clients", "2", "--duration", "0.3", "--loads", "encode", "healthz"]
        + ["encode v1 tensor", "encode v2 binary", "--", "--cpu-threads", "1"]
    )
    out = capsys.readouterr().out
    assert "| encode |" in out and "| healthz |" in out and out.count("| main (event loop) |") == 4
    assert "| encode v2 binary |" in out and "other than 200" not in out, out  # serving.py's binary requests work


def test_thread_cpu_seconds_sees_this_process_working() -> None:
    before = threads.thread_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = threads.thread_cpu_seconds(os.getpid())
    assert after[os.getpid()] - before[os.getpid()] >= 0.02  # 50 ms of CPU, counted in ticks of 10 ms


def test_serving_counts_the_page_faults_of_fresh_memory() -> None:
    """tree_usage's page faults: memory mapped and touched afresh (as a heap handed back and grown again is) counts
    one fault a page or more."""
    _, before = serving.tree_usage(os.getpid())
    with mmap.mmap(-1, 4 << 20) as fresh:
        for offset in range(0, len(fresh), mmap.PAGESIZE):
            fresh[offset] = 1
    _, after = serving.tree_usage(os.getpid())
    assert after - before >= (4 << 20) // mmap.PAGESIZE // 512  # one per page, or per 2 MiB huge page at least


@pytest.mark.parametrize("script", [inprocess, serving, threads, ab])
def test_help(script, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "--checkpoint" in capsys.readouterr().out


def test_a_baseline_build_runs_from_its_own_tree(tmp_path: Path) -> None:
    """`--baseline DIR` adds our service from another source tree (cwd and import path), the same flags as ours."""
    args = serving.argparse.Namespace(
        threads=None, device="cpu", bulk_images=256, checkpoint="checkpoints/mnist", baseline=str(tmp_path)
    )
    ours, _, ours_cwd = serving.server_command("ours", args, 9001)
    base, env, cwd = serving.server_command("ours-baseline", args, 9002)
    assert ours_cwd == serving.REPO and cwd == tmp_path and env["PYTHONPATH"] == str(tmp_path)
    assert base[base.index("--port") + 1] == "9002" and base[:3] == ours[:3]
    with pytest.raises(SystemExit):
        serving.main(["--baseline", str(tmp_path)])  # no service/ there


def test_ab_builds_the_same_loads_at_the_checkpoints_size(tiny_checkpoint: Path) -> None:
    """bench/ab.py: every load is a request for the tiny model's 8x8 input, and NAME=DIR must be a source tree."""
    loads = ab.loads(9000, tiny_checkpoint, 4)
    assert set(loads) == set(ab.KINDS)
    assert b"shape=1,1,8,8&dtype=uint8" in loads["tensor"] and b"shape=4,1,8,8" in loads["bulk tensor"]
    assert len(loads["tensor"].split(b"\r\n\r\n", 1)[1]) == 64
    with pytest.raises(SystemExit):
        ab.main(["encode", "1", "x=/nonexistent"])
    with pytest.raises(SystemExit):
        ab.main(["encode", "1", "x=/nonexistent+--cpu-threads=1"])  # flags after + still need a source tree
    with pytest.raises(SystemExit):
        ab.main(["bulk encode", "1", "p=plain"])  # the hand-written app serves encode, sample and healthz only


def test_ab_pairs_each_round_with_the_references_round() -> None:
    """A machine that slows between rounds moves both sides of a round: the per-round ratio sees through it, the
    ratio of medians does not."""

    def run(rps: float, p50_ms: float) -> loadgen.Result:
        return loadgen.Result(clients=1, latencies=[p50_ms / 1000] * int(rps), seconds=1.0)

    base = [run(1000, 1.0), run(500, 2.0), run(400, 2.5)]
    new = [run(1100, 0.9), run(550, 1.8), run(440, 2.25)]  # 10 % faster in every round
    table = ab.summary({"base": base, "new": new}, "base").splitlines()
    assert table[2].split("|")[4:7] == [" 1.000 ", " 1.000 (1.00-1.00) ", " 1.000 (1.00-1.00) "]
    assert table[3].split("|")[2:7] == [" 550 ", " 1.80 ", " 1.100 ", " 1.100 (1.10-1.10) ", " 0.900 (0.90-0.90) "]
    slower_machine = [run(1100, 0.9), run(300, 3.0), run(440, 2.25)]  # round 2 caught a slow minute
    row = ab.summary({"base": base, "new": slower_machine}, "base").splitlines()[3].split("|")
    assert row[5] == " 1.100 (0.60-1.10) "  # the median of the rounds' ratios is unmoved


@pytest.mark.e2e
def test_serving_measures_the_limits_beside_each_repeat(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]):
    """The in-process limits run once per repeat, before its bulk cells, and the targets use their medians."""
    serving.main(
        ["--checkpoint", str(tiny_checkpoint), "--servers", "ours", "--clients", "1", "--bulk-clients", "1"]
        + ["--binary", "v1 tensor", "--binary-clients", "--bulk-images", "4", "--duration", "0.2", "--repeat", "2"]
    )
    out = capsys.readouterr().out
    for repeat in ("[1/2]", "[2/2]"):
        assert out.count(f"{repeat} in-process limit") == 2, out  # PNG and uint8 tensor, in each repeat
    assert out.index("[1/2] in-process limit") < out.index("[1/2] bulk encode") < out.index("[2/2] in-process limit")
    assert out.count("images/s (median of 2 runs: ") == 2
    assert "of the uint8 tensor in-process limit" in out and "| bulk encode v1 tensor | 1 | ours |" in out
    assert "| server CPU µs/req | page faults/req |" in out


def test_serving_rotates_the_servers_order_each_repeat() -> None:
    """Each server runs first in a cell once every len(servers) repeats."""
    names = ["ours", "plain", "ours-baseline"]
    orders = [serving.rotation(names, repeat) for repeat in range(4)]
    assert orders[0] == names and orders[3] == names
    assert [order[0] for order in orders[:3]] == names
    assert all(sorted(order) == sorted(names) for order in orders)
