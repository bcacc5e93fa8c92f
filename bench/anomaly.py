"""Out-of-distribution detection, before and after model.anomaly: for each checkpoint, AUROC and FPR at 95 % TPR of
the raw score (lower log-likelihood = more anomalous), AUROC of Serra et al.'s complexity-corrected score S
(-log2 p(x) minus the input's zlib length in bits) and AUROC and FPR of the calibrated OOD score, for its own test
images against each other set, and the share of each set that `is_anomaly` flags at a false-positive rate of 5 %;
then the cost of the OOD score beside /v1/score's own computation.

    python bench/anomaly.py checkpoints/fashion-mnist checkpoints/mnist          # ../shared/data or $VAE_DATA_ROOT
    python bench/anomaly.py checkpoints/frey-face --n 120 --k 100 --seed 0
    python bench/anomaly.py checkpoints/mnist --calibration fresh     # refit in memory, ignore the stored one

Sets (--n images each, picked with fixed seeds): the checkpoint's own test split (in-distribution); MNIST digits,
Fashion-MNIST items and Frey faces from all their images, train and test (the model never saw any of them);
uniform noise (every pixel uniform in [0, 1]) and constant images (one uniform grey level each). All are converted
to the model's input as an upload is (bilinear resize: Frey's 28x20 faces become 28x28) and scored as /v1/score
scores a request (model.calibrate.dataset_statistics: binarised for Bernoulli models, k importance samples, one
generator seeded with --seed). The calibration is the checkpoint's own (model.calibrate, fitted on its validation
split) or, without one or with --calibration fresh, fitted here on that split. Deterministic apart from the cost
table. Prints two tables.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench import loadgen  # noqa: E402
from model import anomaly, checkpoint, losses  # noqa: E402
from model.calibrate import dataset_statistics, held_out_images  # noqa: E402
from model.data import default_data_root, load_dataset, to_float  # noqa: E402
from model.preprocess import binarize, pil_to_tensor  # noqa: E402

DATASETS = ("mnist", "fashion-mnist", "frey-face")
LABELS = {
    "mnist": "MNIST digits",
    "fashion-mnist": "Fashion-MNIST items",
    "frey-face": "Frey faces",
    "noise": "uniform noise",
    "constant": "constant images",
}
FLAG_FPR = 0.05


def pick(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


def as_input(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> floats at the model's input shape, converted as an uploaded image is."""
    if tuple(images.shape[1:]) == shape:
        return to_float(images)
    return torch.stack(
        [pil_to_tensor(Image.fromarray(im.permute(1, 2, 0).squeeze(-1).numpy()), shape) for im in images]
    )


def evaluation_sets(card: dict, root: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """{"in": own test images, then every other set} at the model's input shape."""
    shape = tuple(card["config"]["input_shape"])
    own = card["dataset"]["name"]
    sets = {}
    for i, name in enumerate(DATASETS):
        data = load_dataset(name, root)
        images = data.test if name == own else torch.cat([data.train, data.test])
        sets["in" if name == own else name] = as_input(pick(images, n, seed + 1 + i), shape)
    if "in" not in sets:  # a folder dataset: its own split
        data = load_dataset(own, root, card["training"]["config"].get("image_dir"), shape)
        sets["in"] = as_input(pick(data.test, n, seed), shape)
    g = torch.Generator().manual_seed(seed + 10)
    sets["noise"] = torch.rand((n, *shape), generator=g)
    sets["constant"] = torch.rand((n, 1, 1, 1), generator=g).expand(n, *shape).clone()
    return {"in": sets.pop("in"), **sets}


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an OOD image scores above an in-distribution one), ties counting half (the Mann-Whitney statistic)."""
    diff = outside[:, None] - inside[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def fpr_at_tpr(inside: torch.Tensor, outside: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of in-distribution images at or above the highest threshold that still flags `tpr` of the OOD ones."""
    threshold = outside.sort().values[int((1 - tpr) * len(outside))]
    return float((inside >= threshold).double().mean())


def calibration_for(path: Path, model: torch.nn.Module, card: dict, root: str, k: int, mode: str):
    """-> (calibration, where it came from)."""
    stored = anomaly.load_calibration(path, card) if mode == "stored" else None
    if stored is not None:
        return stored, f"stored ({stored.n} held-out images, k={stored.k})"
    x = held_out_images(card, root)
    stats = dataset_statistics(model, x, k=k, seed=0)
    fitted = anomaly.fit(
        stats, k=k, binarized=model.config.likelihood == "bernoulli", weights_sha256=card["weights"]["sha256"]
    )
    return fitted, f"fitted here ({fitted.n} held-out images, k={k})"


def detection_rows(path: Path, args: argparse.Namespace) -> tuple[list[list[object]], str]:
    model, card = checkpoint.load(path)
    reason = anomaly.unsupported_reason(model.config)
    if reason:
        return [], f"{card.get('name', path.name)}: {reason}"
    calibration, origin = calibration_for(path, model, card, args.data_root, args.k, args.calibration)
    raw, serra, ood, flagged = {}, {}, {}, {}
    for name, x in evaluation_sets(card, args.data_root, args.n, args.seed).items():
        stats = dataset_statistics(model, x, k=args.k, seed=args.seed)
        raw[name] = -stats["log_likelihood"].double()
        serra[name] = raw[name] / math.log(2) - stats["complexity_bits"].double()  # Serra et al.'s S, in bits
        verdict = calibration.assess(stats, FLAG_FPR)
        ood[name], flagged[name] = verdict["ood_score"], verdict["is_anomaly"].double().mean().item()
    rows = []
    for name in raw:
        if name == "in":
            continue
        rows.append(
            [
                card["name"],
                LABELS[name],
                f"{auroc(raw['in'], raw[name]):.3f}",
                f"{auroc(serra['in'], serra[name]):.3f}",
                f"{auroc(ood['in'], ood[name]):.3f}",
                f"{fpr_at_tpr(raw['in'], raw[name]):.3f}",
                f"{fpr_at_tpr(ood['in'], ood[name]):.3f}",
                f"{flagged[name]:.3f}",
            ]
        )
    note = f"{card['name']}: calibration {origin}; in-distribution test images flagged at fpr {FLAG_FPR}: "
    return rows, note + f"{flagged['in']:.3f}"


def best_time(rounds: int, fn: Callable[..., object], *args: object) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return min(times)


@torch.inference_mode()
def score(model: torch.nn.Module, x: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What /v1/score computes for a batch today (service.predictor._score): the ELBO, then the likelihood."""
    g = torch.Generator().manual_seed(0)
    terms = losses.elbo(model, x, generator=g)
    ll = losses.iwae_log_likelihood(model, x, k=k, generator=g)
    return {"elbo": terms.elbo, "recon": terms.recon, "kl": terms.kl, "log_likelihood": ll}


def ood_part(calibration: anomaly.Calibration, stats: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """What the OOD score adds: the compressed length of each input, then density, p-value and decision."""
    calibration.assess({**stats, "complexity_bits": anomaly.complexity_bits(x)}, FLAG_FPR)


def cost_rows(path: Path, args: argparse.Namespace) -> list[list[object]]:
    """Milliseconds per image of /v1/score's computation (ELBO + k-sample likelihood) and of what the OOD score adds,
    at batch 1 and 64, on binarised noise images; best of --rounds."""
    model, card = checkpoint.load(path)
    if anomaly.unsupported_reason(model.config):
        return []
    calibration, _ = calibration_for(path, model, card, args.data_root, args.k, args.calibration)
    rows = []
    for batch in (1, 64):
        x = binarize(torch.rand((batch, *model.config.input_shape), generator=torch.Generator().manual_seed(0)))
        stats = score(model, x, args.k)
        base = best_time(args.rounds, score, model, x, args.k) / batch
        added = best_time(args.rounds * 20, ood_part, calibration, stats, x) / batch
        rows.append(
            [card["name"], batch, args.k, f"{base * 1e3:.3f}", f"{added * 1e3:.4f}", f"{100 * added / base:.2f} %"]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint directories")
    p.add_argument("--data-root", default=None, help="default: $VAE_DATA_ROOT, else ../shared/data, else ./data")
    p.add_argument("--n", type=int, default=120, help="images per set")
    p.add_argument("--k", type=int, default=anomaly.DEFAULT_K, help="importance samples (/v1/score's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration", choices=("stored", "fresh"), default="stored")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-identical runs)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds for the cost table (the best is kept)")
    p.add_argument("--no-cost", action="store_true", help="skip the cost table")
    args = p.parse_args(argv)
    if args.data_root is None:
        shared = loadgen.REPO.parent / "shared" / "data"
        args.data_root = str(shared) if "VAE_DATA_ROOT" not in os.environ and shared.is_dir() else default_data_root()
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    for path in args.checkpoints:
        r, note = detection_rows(path, args)
        rows += r
        notes.append(note)
    print(
        f"\n{args.n} images per set, k={args.k}, seed {args.seed}, torch threads {args.threads}; {loadgen.machine()}\n"
    )
    headers = [
        "model",
        "OOD set",
        "AUROC raw",
        "AUROC S",
        "AUROC ood",
        "FPR@95 raw",
        "FPR@95 ood",
        f"flagged @{FLAG_FPR}",
    ]
    print(loadgen.table(headers, rows, "ll" + "r" * 6))
    print("\n" + "\n".join(notes))
    if not args.no_cost:
        cost = [row for path in args.checkpoints for row in cost_rows(path, args)]
        print("\n" + loadgen.table(["model", "batch", "k", "score ms/image", "OOD adds ms/image", "share"], cost))


if __name__ == "__main__":
    main()
