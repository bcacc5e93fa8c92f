"""Re-measure a checkpoint on its dataset's test set: `python -m model.evaluate CHECKPOINT --k 5000`.

Recomputes the test ELBO and the importance-weighted NLL and, on a full-test-set run, writes them into the card."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from model import checkpoint
from model.data import default_data_root, fixed_binarized, load_dataset, to_float
from model.losses import bits_per_dim
from model.metrics import full_metrics


def load_test_set(card: dict[str, Any], data_root: str, image_dir: str | None = None) -> torch.Tensor:
    """The test images exactly as training measured them (fixed-seed binarisation for Bernoulli models)."""
    config = card["config"]
    name = card["dataset"]["name"]
    data = load_dataset(
        name, data_root, image_dir or card["training"]["config"].get("image_dir"), tuple(config["input_shape"])
    )
    test = to_float(data.test)
    return fixed_binarized(test, seed=0) if config["likelihood"] == "bernoulli" else test


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description="Recompute a checkpoint's test ELBO and importance-weighted NLL; update its model card.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--k", type=int, default=5000, help="importance samples per test image")
    p.add_argument("--limit", type=int, default=None, help="only the first N test images (the card is not updated)")
    p.add_argument("--data-root", default=None, help="default: $VAE_DATA_ROOT, else ./data")
    p.add_argument("--image-dir", default=None, help="for checkpoints trained on --dataset folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per op (with --workers 1)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="share the test batches out to this many single-threaded workers (faster than --threads on busy cores)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object (elbo, nll, k, n) instead of a table")
    p.add_argument("--no-update", action="store_true", help="do not write the figures into the card")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        model, card = checkpoint.load(a.checkpoint, a.device)
        x = load_test_set(card, a.data_root or default_data_root(), a.image_dir)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.limit is not None:
        x = x[: a.limit]
    started = time.time()
    metrics = full_metrics(model, x, k=a.k, seed=a.seed, progress=not a.json, workers=a.workers)
    seconds = round(time.time() - started, 1)
    nll = metrics.get("test_nll")
    if a.json:
        print(
            json.dumps(
                {
                    "elbo": metrics["test_elbo"],
                    "nll": nll,
                    "k": a.k if nll is not None else None,
                    "n": len(x),
                    "seconds": seconds,
                }
            )
        )
    else:
        rows = [
            ("checkpoint", a.checkpoint),
            ("test images", len(x)),
            ("ELBO (nats)", metrics["test_elbo"]),
            ("  reconstruction", metrics["test_recon"]),
            ("  KL", metrics["test_kl"]),
            ("active units", metrics["active_units"]),
        ]
        if nll is not None:
            rows += [(f"NLL, k={a.k} (nats)", nll), ("bits/dim", round(bits_per_dim(nll, model.config.input_dim), 5))]
        rows.append(("seconds", seconds))
        width = max(len(r[0]) for r in rows)
        print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    if a.limit is None and not a.no_update:
        old = card.get("metrics", {})
        keep = {k: v for k, v in old.items() if k in ("best_epoch", "best_val_elbo")}
        checkpoint.update_card(a.checkpoint, metrics={**metrics, **keep, "evaluated_s": seconds})


if __name__ == "__main__":
    main()
