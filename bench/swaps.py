"""Versions swapped under load: a model reloaded every 2 s while 64 clients send seeded requests, every answer checked
against a direct call of the version it names; then the server's memory across unloads.

    python -m bench.swaps                                  # 64 clients, 60 s without swaps, then 60 s with them
    python -m bench.swaps --duration 10 --clients 16       # a quick run

Builds a models directory holding one model, `swap`, with two versions: 1 = `--first` (checkpoints/mnist, the conv
VAE) and 2 = `--second` (checkpoints/mnist-mlp): different weights, the same input and latent sizes, so every request
fits both and each answer shows which computed it. Starts `python -m service` on it with an admin key, and runs the
same load twice through bench/loadgen.py: `--duration` seconds as it is, then `--duration` seconds while a reloader,
every `--every` seconds, copies the next version in (alternating the two weights: odd versions `--first`, even ones
`--second`), removes the oldest and calls POST /v1/models/swap/reload. The model's default is its newest version, so
the version answering changes with every reload, and requests in flight at the swap finish on the old one.

The requests are bench/soak.py's pool (seeded encodes with a sampled z, decodes of seeded latents, seeded prior
samples), with the answers of both weights computed beforehand in this process. Each answer counts as failed (not a
200, or no answer), wrong (matches neither weights), crossed (matches the other weights than those of the version
it names), or mislabelled (its `version` field and X-Model-Version header disagree). Latency: p50 and p99 of each
phase, and of the requests in flight while a reload ran.

Then memory: the server's RSS with the two versions loaded, after POST /unload, and after `--cycles` more load +
unload rounds (a leak would grow it). Markdown tables, for docs/models.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen, memory, soak

KEY = "bench-admin-key"


@dataclass
class Tally:
    """What one phase saw: latencies (sent, seconds) of answers, and the answers' problems."""

    answers: list[tuple[float, float]] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    wrong: int = 0
    crossed: int = 0
    mislabelled: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def header(head: bytes, name: bytes) -> str | None:
    at = head.lower().find(b"\r\n" + name + b":")
    if at < 0:
        return None
    end = head.find(b"\r\n", at + 2)
    return head[at + len(name) + 3 : end if end >= 0 else None].strip().decode()


def checker(tally: Tally, pools: dict[str, list[soak.Known]], held_by: dict[str, str]) -> loadgen.OnAnswer:
    """The loadgen callback: each answer checked against both weights' known answers to its request. A body seen
    before (the version field aside) reuses its verdict, so checking costs the generator little CPU."""
    verdicts: dict[tuple[int, bytes], str] = {}  # (request, body after its version field) -> weights, or ""

    def which(index: int, body: bytes) -> str:
        answer = json.loads(body)
        for weights, pool in pools.items():
            if soak.close(answer.get(pool[index].field), pool[index].expected):
                return weights
        return ""

    def on_answer(index: int, status: int, head: bytes, body: bytes, sent: float, latency: float) -> None:
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        if status != 200:
            tally.failed += 1
            return
        tally.answers.append((sent, latency))
        version = header(head, b"x-model-version") or ""
        tally.versions[version] = tally.versions.get(version, 0) + 1
        field_at = body.find(b'"version":"' + version.encode() + b'",', 0, 100)
        if field_at < 0:
            tally.mislabelled += 1
        key = (index, body[field_at + 13 + len(version) :] if field_at >= 0 else body)
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = which(index, body)
        if verdict == held_by.get(version):
            return
        if verdict:
            tally.crossed += 1
        else:
            tally.wrong += 1

    return on_answer


def post(port: int, path: str) -> dict:
    request = urllib.request.Request(f"http://{loadgen.HOST}:{port}{path}", method="POST", headers={"X-Admin-Key": KEY})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def put_version(folder: Path, version: int, source: Path) -> None:
    """A checkpoint copied in as a version: under a dot-name (the server never reads those), then renamed."""
    staging = folder / f".{version}.incoming"
    shutil.copytree(source, staging)
    os.replace(staging, folder / str(version))


async def reloader(
    port: int,
    folder: Path,
    sources: dict[str, Path],
    held_by: dict[str, str],
    every: float,
    until: float,
    windows: list[tuple[float, float]],
    problems: list[str],
) -> None:
    """Every `every` seconds: the next version in, the oldest out, POST reload; each call's (start, end) kept."""
    version = max(int(v) for v in held_by) + 1
    while time.perf_counter() + every < until:
        await asyncio.sleep(every)
        weights = "first" if version % 2 else "second"
        held_by[str(version)] = weights
        await asyncio.to_thread(put_version, folder, version, sources[weights])
        await asyncio.to_thread(shutil.rmtree, folder / str(version - 2))
        started = time.perf_counter()
        try:
            change = await asyncio.to_thread(post, port, "/v1/models/swap/reload")
        except OSError as e:
            problems.append(f"reload to version {version}: {e}")
        else:
            if change["loaded"] != [str(version)] or change["unloaded"] != [str(version - 2)]:
                problems.append(f"reload to version {version}: {change}")
        windows.append((started, time.perf_counter()))
        version += 1


async def phase(
    port: int,
    requests: list[bytes],
    args: argparse.Namespace,
    tally: Tally,
    pools,
    held_by,
    swaps: Path | None,
    sources: dict[str, Path],
    windows: list[tuple[float, float]],
    problems: list[str],
) -> loadgen.Result:
    load = loadgen.load(port, requests, args.clients, 10**9, args.duration, on_answer=checker(tally, pools, held_by))
    if swaps is None:
        return await load
    until = time.perf_counter() + args.duration
    result, _ = await asyncio.gather(
        load, reloader(port, swaps, sources, held_by, args.every, until, windows, problems)
    )
    return result


def during(answers: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    """Latencies of the answers whose request was in flight while a reload call ran."""
    return [s for sent, s in answers if any(sent <= end and sent + s >= start for start, end in windows)]


def ms(values: list[float], q: float) -> str:
    return f"{loadgen.percentile(values, q) * 1000:.1f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=Path, default=loadgen.REPO / "checkpoints" / "mnist", help="odd versions")
    parser.add_argument("--second", type=Path, default=loadgen.REPO / "checkpoints" / "mnist-mlp", help="even ones")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load in each phase")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between reloads")
    parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
    parser.add_argument("--pool", type=int, default=96, help="distinct requests with known answers")
    parser.add_argument("--cycles", type=int, default=5, help="load + unload rounds for the memory table")
    parser.add_argument("--cpu-threads", type=int, default=1, help="the server's torch threads")
    args = parser.parse_args(argv)

    pools = {"first": soak.pool(args.first, args.pool), "second": soak.pool(args.second, args.pool)}
    requests = [known.raw for known in pools["first"]]
    assert requests == [known.raw for known in pools["second"]], "the two checkpoints take different requests"
    sources = {"first": args.first, "second": args.second}
    print(loadgen.machine())
    with tempfile.TemporaryDirectory(prefix="vae-swaps-") as tmp:
        folder = Path(tmp) / "swap"
        folder.mkdir()
        put_version(folder, 1, args.first)
        put_version(folder, 2, args.second)
        held_by = {"1": "first", "2": "second"}
        port = loadgen.free_port()
        command = [
            sys.executable, "-m", "service", "--models-dir", tmp, "--admin-key", KEY, "--host", loadgen.HOST,
            "--port", str(port), "--no-access-log", "--log-level", "warning", "--cpu-threads", str(args.cpu_threads),
            "--no-grpc",
        ]  # fmt: skip
        rows, tallies, problems, windows = [], {}, [], []
        with loadgen.Server("swaps", command, port, ready_path="/readyz") as server:
            for label, swaps in (("without swaps", None), (f"reload every {args.every:g} s", folder)):
                tally = Tally()
                loads = os.getloadavg()
                result = asyncio.run(
                    phase(port, requests, args, tally, pools, held_by, swaps, sources, windows, problems)
                )
                tallies[label] = (tally, result)
                latencies = [s for _, s in tally.answers]
                rows.append(
                    [
                        label,
                        len(tally.answers) + tally.failed,
                        result.errors,
                        tally.wrong,
                        tally.crossed,
                        tally.mislabelled,
                        len(tally.versions),
                        f"{len(latencies) / result.seconds:.0f}",
                        ms(latencies, 50),
                        ms(latencies, 99),
                        f"{loads[0]:.1f}",
                    ]
                )
            calls = [end - start for start, end in windows]
            in_swaps = during(tallies[f"reload every {args.every:g} s"][0].answers, windows)
            rss = [("2 versions loaded", memory.rss_mb(server.pid))]
            post(port, "/v1/models/swap/unload")
            time.sleep(1.0)
            rss.append(("after unload", memory.rss_mb(server.pid)))
            for cycle in range(1, args.cycles + 1):
                post(port, "/v1/models/swap/load")
                loaded = memory.rss_mb(server.pid)
                post(port, "/v1/models/swap/unload")
                time.sleep(0.5)
                rss.append((f"cycle {cycle}: loaded {loaded:.0f}, after unload", memory.rss_mb(server.pid)))

    print()
    print(
        loadgen.table(
            [
                "phase",
                "requests",
                "failed",
                "wrong",
                "crossed",
                "mislabelled",
                "versions answering",
                "req/s",
                "p50 ms",
                "p99 ms",
                "load avg (1 min)",
            ],
            rows,
        )  # fmt: skip
    )
    print()
    print(
        f"p99 of the {len(in_swaps)} requests in flight while one of the {len(windows)} reloads ran: "
        f"{ms(in_swaps, 99)} ms (p50 {ms(in_swaps, 50)} ms); reload calls took {ms(calls, 50)} ms (median), "
        f"{ms(calls, 100)} ms (max)"
    )
    print()
    print(loadgen.table(["server RSS", "MiB"], [[label, f"{mb:.0f}"] for label, mb in rss]))
    print()
    print(
        f"settings: {args.clients} clients, {args.duration:g} s per phase, pool of {len(requests)} requests, versions "
        f"alternate {args.first.name} (odd) and {args.second.name} (even), server --cpu-threads {args.cpu_threads}"
    )
    for problem in problems:
        print(f"problem: {problem}")
    swapped = tallies[f"reload every {args.every:g} s"][0]
    verdicts = [
        ("no failed request", all(t.failed == 0 and r.errors == 0 for t, r in tallies.values())),
        ("no wrong answer", all(t.wrong == 0 for t, _ in tallies.values())),
        ("no answer by another version than the one named", all(t.crossed == 0 for t, _ in tallies.values())),
        ("field and header agree", all(t.mislabelled == 0 for t, _ in tallies.values())),
        ("every reload swapped a version", not problems and len(windows) >= 1),
        ("the load spanned the swaps", len(swapped.versions) > 1),
    ]
    for name, good in verdicts:
        print(f"verdict: {'PASS' if good else 'FAIL'}: {name}")
    return 0 if all(good for _, good in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
