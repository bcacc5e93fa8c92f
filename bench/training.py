"""Training speed of the default MNIST model: images/s per epoch of `python -m model.train` (as its metrics.csv
logs them: the epoch's steps, its dynamic binarisation, and its validation and test ELBO passes) against the raw
PyTorch step on the same batch (forward, loss, backward, Adam step on one fixed batch: no data pipeline, no
evaluation), and the speed-up of the 2-process data-parallel run (`torchrun --nproc_per_node 2`).

    python bench/training.py                                   # ../shared/data or $VAE_DATA_ROOT, ~3 minutes
    python bench/training.py --epochs 1 --runs single ddp      # quicker
    python bench/training.py --device cuda                     # skips cleanly without CUDA

The model, batch size and objective are those of the checkpoint's own training command (its model card); each run
trains --epochs epochs into a temporary directory with a quick final evaluation, and the table shows the median
epoch. Prints one table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import inprocess, loadgen  # noqa: E402
from model.losses import training_loss  # noqa: E402
from model.vae import VAE, VAEConfig  # noqa: E402

REPO = loadgen.REPO
# Options of the card's command that a benchmark run replaces (with their number of values).
REPLACED = {
    "--epochs": 1,
    "--out": 1,
    "--max-minutes": 1,
    "--eval-k": 1,
    "--eval-limit": 1,
    "--data-root": 1,
    "--threads": 1,
    "--device": 1,
    "--name": 1,
    "--patience": 1,
    "--no-progress": 0,
    "--resume": 0,
}


def card_command(checkpoint: Path) -> list[str]:
    """The training flags recorded in the checkpoint's card, minus the ones each run sets itself."""
    command = json.loads((checkpoint / "model_card.json").read_text())["training"]["command"]
    words = shlex.split(command)
    words = words[words.index("model.train") + 1 :]
    kept, i = [], 0
    while i < len(words):
        if words[i] in REPLACED:
            i += 1 + REPLACED[words[i]]
            continue
        kept.append(words[i])
        i += 1
    return kept


def flag(words: list[str], name: str, default: str) -> str:
    return words[words.index(name) + 1] if name in words else default


def train_run(
    label: str, flags: list[str], args: argparse.Namespace, processes: int, threads: int
) -> dict[str, object]:
    """One `model.train` run; the median epoch's images/s from its metrics.csv."""
    with tempfile.TemporaryDirectory(prefix="vae-bench-train-") as tmp:
        out = Path(tmp) / "run"
        common = [
            *flags,
            "--epochs",
            str(args.epochs),
            "--out",
            str(out),
            "--data-root",
            args.data_root,
            "--threads",
            str(threads),
            "--device",
            args.device,
            "--eval-k",
            "2",
            "--eval-limit",
            "100",
            "--no-progress",
        ]
        if processes == 1:
            command = [sys.executable, "-m", "model.train", *common]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(processes),
                "-m",
                "model.train",
                *common,
            ]
        started = time.monotonic()
        subprocess.run(
            command,
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=args.timeout,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        with (out / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
    rates = [float(r["images_per_s"]) for r in rows]
    seconds = [float(r["seconds"]) for r in rows]
    return {
        "label": label,
        "processes": processes,
        "threads": threads,
        "images_per_s": statistics.median(rates),
        "epoch_s": statistics.median(seconds),
        "wall_s": time.monotonic() - started,
    }


def raw_step_rate(checkpoint: Path, flags: list[str], threads: int, device: str, seconds: float) -> float:
    """Images/s of the bare step (forward, the run's objective, backward, Adam) on one fixed batch."""
    torch.set_num_threads(threads)
    config = VAEConfig.from_dict(json.loads((checkpoint / "model_card.json").read_text())["config"])
    batch, k = int(flag(flags, "--batch-size", "100")), int(flag(flags, "--iwae-k", "1"))
    model = VAE(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand((batch, *config.input_shape), generator=generator), generator=generator).to(device)

    def step() -> None:
        out = model(x, generator=generator, samples=k)
        loss, _ = training_loss(model, x, out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def synced_step() -> None:
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # The best of three rounds, as in bench/inprocess.py: a busy moment slows one round, not the figure.
    return batch / inprocess.best_seconds_per_call(synced_step, seconds / 3, 3, 1_000_000)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", default="checkpoints/mnist", help="its card's training command is the workload")
    p.add_argument("--data-root", default=os.environ.get("VAE_DATA_ROOT", str(REPO.parent / "shared" / "data")))
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (the median epoch is reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of a single process")
    p.add_argument(
        "--runs",
        nargs="+",
        default=["single", "single-1thread", "ddp"],
        choices=["single", "single-1thread", "ddp"],
        help="single: 1 process x --threads; single-1thread; ddp: 2 processes x --threads/2 threads",
    )
    p.add_argument("--raw-seconds", type=float, default=5.0, help="length of the raw-step measurement")
    p.add_argument("--timeout", type=float, default=900, help="the longest one run may take (s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA absent: prints why and skips)")
    args = p.parse_args(argv)
    if loadgen.cuda_missing(args.device):
        return
    checkpoint = Path(args.checkpoint).resolve()
    flags = card_command(checkpoint)
    dataset = flag(flags, "--dataset", "mnist")
    if dataset != "folder" and not (Path(args.data_root) / dataset).is_dir():
        print(f"skipped: no {dataset} data under {args.data_root} (--data-root, or $VAE_DATA_ROOT)")
        return
    raw = raw_step_rate(checkpoint, flags, args.threads, args.device, args.raw_seconds)
    shapes = {"single": (1, args.threads), "single-1thread": (1, 1), "ddp": (2, max(1, args.threads // 2))}
    runs = [train_run(name, flags, args, *shapes[name]) for name in args.runs]
    by = {r["label"]: r for r in runs}
    rows = [["raw step, one fixed batch", 1, args.threads, f"{raw:,.0f}", "-", "1.00"]]
    for r in runs:
        rate = float(r["images_per_s"])  # type: ignore[arg-type]
        rows.append(
            [
                f"model.train epoch ({r['label']})",
                r["processes"],
                r["threads"],
                f"{rate:,.0f}",
                f"{r['epoch_s']:.1f}",
                f"{rate / raw:.2f}",
            ]
        )
    print(
        f"\n{checkpoint.name}: {' '.join(flags)}; {args.epochs} epoch(s) per run on {args.device}; "
        f"{loadgen.machine()}\n"
    )
    print(loadgen.table(["what", "processes", "threads each", "images/s", "epoch s", "vs raw step"], rows))
    if "ddp" in by:
        ddp = float(by["ddp"]["images_per_s"])  # type: ignore[arg-type]
        print()
        for name in ("single", "single-1thread"):
            if name in by:
                r = by[name]
                print(
                    f"2-process data-parallel speed-up over 1 process x {r['threads']} thread(s): "
                    f"{ddp / float(r['images_per_s']):.2f}x"
                )  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
