"""Out-of-distribution scores for a VAE: per-image statistics, a density fitted to them on held-out
in-distribution data, and calibrated p-values.

The raw log-likelihood ranks the known hard case backwards: a Fashion-MNIST model gives MNIST digits *higher*
likelihood than its own test items, because simple images are likely under any model (Nalisnick et al. 2019).
Correcting it with the input's compressed length (Serra et al. 2020) fixes that case but makes noise look typical.
So, as DoSE does (Morningstar et al. 2021), no single statistic decides: each image is summarised by a few numbers
the score already computes (log-likelihood, the ELBO's KL and reconstruction terms) plus its compressed length, a
Gaussian is fitted to those vectors on the model's own held-out data, and the OOD score is the vector's negative
log-density under it. A digit is then anomalous for the Fashion-MNIST model not for its likelihood alone but for a
likelihood far too high for its complexity, and noise for both being far out.

The p-value is conformal: the fraction of held-out in-distribution scores at or above this one, with the +1
correction, so P(p <= a) <= a for an in-distribution image and `p <= fpr` keeps to that false-positive rate. The
held-out scores come from K-fold cross-fitting, so every held-out image is scored by a density that did not see it
(fitted on (K-1)/K of them, a little less sharp than the final fit on all: which only makes the p-values conservative;
split conformal's exact finite-sample bound would need a density fitted on part of the data only).

A calibration is stored beside the weights as `calibration.safetensors` (tensors + string metadata, no pickle) and
summarised, with its sha256, in the card's `calibration` section; `load_calibration` validates both.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from model import losses
from model.checkpoint import CARD_FILE, CheckpointError, read_card, sha256_file, write_json_atomic
from model.vae import VAE, VAEConfig

FORMAT_VERSION = 1
CALIBRATION_FILE = "calibration.safetensors"
# What the density is fitted on, in this order. All but complexity_bits are /v1/score's own outputs.
STATISTICS = ("log_likelihood", "kl", "recon", "complexity_bits")
TENSORS = ("mean", "covariance", "reference_scores")
METADATA = ("format_version", "statistics", "k", "binarized", "weights_sha256", "info")
DEFAULT_K = 100  # /v1/score's default number of importance samples: calibrate with the estimator users get
FOLDS = 5  # cross-fitting folds for the held-out reference scores
MIN_IMAGES = 20  # fewer held-out images give p-values no finer than 1/21 and a covariance from noise
LOG_2PI = math.log(2 * math.pi)


class CalibrationError(CheckpointError):
    """A calibration that cannot be used: missing or replaced file, unknown version, wrong keys or shapes,
    non-finite values, or computed for other weights."""


def unsupported_reason(config: VAEConfig) -> str | None:
    """Why a model gets no OOD score (a sentence for a 422), or None when it can be scored."""
    if config.kind == "ae":
        return (
            "a plain autoencoder (kind 'ae') defines no likelihood p(x), so it has no out-of-distribution score; "
            "use a VAE checkpoint"
        )
    return None


def complexity_bits(x: torch.Tensor) -> torch.Tensor:
    """Length in bits of each image's zlib encoding (level 9) at 8 bits per value, (B,) float32: a generic
    compressor's estimate of the input's complexity (Serra et al. 2020 use PNG; zlib on the raw bytes has no PNG
    header or filter choice in the way). x is the model's input (B, C, H, W) in [0, 1], binarised or not."""
    data = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).flatten(1).cpu().numpy()  # (B, C*H*W)
    return torch.tensor([8.0 * len(zlib.compress(row.tobytes(), 9)) for row in data], dtype=torch.float32)


@torch.no_grad()
def score_statistics(
    model: VAE, x: torch.Tensor, k: int = DEFAULT_K, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """/v1/score's numbers for a batch x (the model's input: binarised for Bernoulli models) plus complexity_bits,
    each (B,): elbo, recon, kl (one-sample ELBO), log_likelihood (IWAE, k samples), complexity_bits.

    The ELBO and the likelihood draw from `generator` in that order, as the service always has, so its existing
    figures do not change."""
    reason = unsupported_reason(model.config)
    if reason:
        raise ValueError(reason)
    terms = losses.elbo(model, x, generator=generator)
    ll = losses.iwae_log_likelihood(model, x, k=k, generator=generator)
    return {
        "elbo": terms.elbo,
        "recon": terms.recon,
        "kl": terms.kl,
        "log_likelihood": ll,
        "complexity_bits": complexity_bits(x).to(ll.device),
    }


def _stack(stats: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    missing = [n for n in names if n not in stats]
    if missing:
        raise KeyError(f"statistics missing for the OOD score: {missing} (have {sorted(stats)})")
    cols = [torch.as_tensor(stats[n]).detach().to("cpu", torch.float64).reshape(-1) for n in names]
    if len({len(c) for c in cols}) != 1:
        raise ValueError(f"statistics have different lengths: {[len(c) for c in cols]}")
    return torch.stack(cols, dim=1)  # (B, S)


def _gaussian(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of rows (n, S), the correlation shrunk towards identity by S/n (a ridge that matters
    only for tiny held-out sets, where the sample covariance is singular)."""
    n, s = rows.shape
    mean = rows.mean(0)
    centred = rows - mean
    cov = centred.T @ centred / max(n - 1, 1)
    std = cov.diagonal().clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant statistic gets unit scale
    corr = cov / std[:, None] / std[None, :]
    shrink = min(1.0, s / n)
    corr = (1 - shrink) * corr + shrink * torch.eye(s, dtype=rows.dtype) + 1e-9 * torch.eye(s, dtype=rows.dtype)
    return mean, corr * std[:, None] * std[None, :]


def _whitener(chol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor L of Sigma -> (L^-1, 1/2 log det(2 pi Sigma)): formed once, so scoring a batch is one small
    matmul (a triangular solve per batch cost milliseconds on CPU, L^-1 times a (B, S) batch microseconds)."""
    return torch.linalg.inv(chol), chol.diagonal().log().sum() + 0.5 * len(chol) * LOG_2PI


def _neg_log_density(
    rows: torch.Tensor, mean: torch.Tensor, whitener: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """-log N(rows; mean, Sigma) per row, in nats: 1/2 Mahalanobis^2 + 1/2 log det(2 pi Sigma)."""
    inv_chol, half_logdet = whitener
    white = (rows - mean) @ inv_chol.T  # (B, S): whitened statistics
    return 0.5 * white.pow(2).sum(1) + half_logdet


@dataclass(frozen=True, eq=False)  # tensors: compare fields with torch.equal
class Calibration:
    """A fitted OOD scorer: a Gaussian over `statistics` and the sorted held-out in-distribution scores.

    ood_score(stats) -> (B,) negative log-density in nats (higher = more anomalous); p_value(scores) -> (B,) in
    (0, 1]; assess(stats, fpr) -> all three with is_anomaly = p_value <= fpr. Construction validates shapes and
    values and raises ValueError."""

    statistics: tuple[str, ...]
    mean: torch.Tensor  # (S,) float64
    covariance: torch.Tensor  # (S, S) float64, symmetric positive definite
    reference_scores: torch.Tensor  # (N,) float64, ascending: held-out in-distribution OOD scores
    k: int  # importance samples of the log-likelihood it was fitted with
    binarized: bool  # whether the statistics were computed on binarised inputs (Bernoulli models)
    weights_sha256: str  # the weights it belongs to
    info: dict[str, Any] = field(default_factory=dict)  # provenance: data, n, folds, created
    whitener: tuple[torch.Tensor, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = len(self.statistics)
        unknown = set(self.statistics) - set(STATISTICS)
        if s == 0 or unknown or len(set(self.statistics)) != s:
            raise ValueError(f"statistics must be distinct names from {STATISTICS}, got {list(self.statistics)}")
        for name, t, shape in (("mean", self.mean, (s,)), ("covariance", self.covariance, (s, s))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(t, 'shape', ()))}")
        ref = self.reference_scores
        if not isinstance(ref, torch.Tensor) or ref.dim() != 1 or len(ref) < 1:
            raise ValueError("reference_scores must be a non-empty 1-D tensor")
        for name, t in (("mean", self.mean), ("covariance", self.covariance), ("reference_scores", ref)):
            if t.dtype != torch.float64 or not torch.isfinite(t).all():
                raise ValueError(f"{name} must be finite float64 values")
        if bool((ref[1:] < ref[:-1]).any()):
            raise ValueError("reference_scores must be sorted ascending")
        if not torch.allclose(self.covariance, self.covariance.T):
            raise ValueError("covariance must be symmetric")
        chol, bad = torch.linalg.cholesky_ex(self.covariance)
        if bad:
            raise ValueError("covariance must be positive definite")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        object.__setattr__(self, "whitener", _whitener(chol))

    @property
    def n(self) -> int:
        return len(self.reference_scores)

    @property
    def min_fpr(self) -> float:
        """The smallest false-positive rate that can flag anything: 1 / (N + 1), the smallest p-value."""
        return 1.0 / (self.n + 1)

    def ood_score(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-image statistics (each (B,)) -> the negative log-density of their vector, (B,) float64, nats."""
        return _neg_log_density(_stack(stats, self.statistics), self.mean, self.whitener)

    def p_value(self, scores: torch.Tensor) -> torch.Tensor:
        """(1 + #{held-out scores >= s}) / (N + 1) per score: in (0, 1], non-increasing in s."""
        s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        at_or_above = self.n - torch.searchsorted(self.reference_scores, s, side="left")
        return (1 + at_or_above).to(torch.float64) / (self.n + 1)

    def assess(self, stats: Mapping[str, torch.Tensor], fpr: float) -> dict[str, torch.Tensor]:
        """-> {"ood_score", "p_value", "is_anomaly"}, each (B,): the decision flags p_value <= fpr, which keeps the
        false-positive rate on in-distribution images at or below fpr."""
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"the false-positive rate must lie in (0, 1), got {fpr}")
        score = self.ood_score(stats)
        p = self.p_value(score)
        return {"ood_score": score, "p_value": p, "is_anomaly": p <= fpr}

    def summary(self) -> dict[str, Any]:
        """What the card and /v1/models tell about it (no arrays)."""
        return {
            "format_version": FORMAT_VERSION,
            "method": "gaussian density over per-image statistics (DoSE-style)",
            "statistics": list(self.statistics),
            "k": self.k,
            "binarized": self.binarized,
            "n": self.n,
            "min_fpr": round(self.min_fpr, 6),
            **self.info,
        }


def fit(
    stats: Mapping[str, torch.Tensor],
    *,
    k: int,
    binarized: bool,
    weights_sha256: str,
    statistics: tuple[str, ...] = STATISTICS,
    folds: int = FOLDS,
    info: dict[str, Any] | None = None,
) -> Calibration:
    """Fit the Gaussian on held-out in-distribution statistics and score each image by a fit on the other folds.

    Folds are contiguous slices: the held-out images come in random order (a seeded split of the training set)."""
    rows = _stack(stats, statistics)
    n = len(rows)
    if n < MIN_IMAGES:
        raise ValueError(f"calibration needs at least {MIN_IMAGES} held-out images, got {n}")
    if not torch.isfinite(rows).all():
        raise ValueError("held-out statistics contain non-finite values")
    folds = max(2, min(folds, n))
    reference = torch.empty(n, dtype=torch.float64)
    for idx in torch.arange(n).tensor_split(folds):
        keep = torch.ones(n, dtype=torch.bool)
        keep[idx] = False
        mean, cov = _gaussian(rows[keep])
        reference[idx] = _neg_log_density(rows[idx], mean, _whitener(torch.linalg.cholesky(cov)))
    mean, cov = _gaussian(rows)
    info = {"folds": folds, **(info or {})}
    return Calibration(tuple(statistics), mean, cov, reference.sort().values, k, binarized, weights_sha256, info)


# -- storage -----------------------------------------------------------------------------------------------------
def save_calibration(calibration: Calibration, directory: str | Path) -> dict[str, Any]:
    """Write calibration.safetensors into a checkpoint directory and its summary (with the file's sha256) into the
    card's `calibration` section; returns that section."""
    directory = Path(directory)
    tensors = {
        "mean": calibration.mean,
        "covariance": calibration.covariance,
        "reference_scores": calibration.reference_scores,
    }
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "statistics": json.dumps(list(calibration.statistics)),
        "k": str(calibration.k),
        "binarized": json.dumps(calibration.binarized),
        "weights_sha256": calibration.weights_sha256,
        "info": json.dumps(calibration.info),
    }
    path = directory / CALIBRATION_FILE
    tmp = directory / f".{CALIBRATION_FILE}.tmp"
    tmp.write_bytes(save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    tmp.chmod(0o644)
    tmp.replace(path)
    section = {"file": CALIBRATION_FILE, "sha256": sha256_file(path), **calibration.summary()}
    card = read_card(directory)
    card["calibration"] = section  # replaces an older section whole
    write_json_atomic(directory / CARD_FILE, card)
    return section


def load_calibration(directory: str | Path, card: dict[str, Any] | None = None) -> Calibration | None:
    """The checkpoint's calibration, or None when its card has no `calibration` section (an uncalibrated checkpoint
    loads and serves without OOD scores). Raises CalibrationError, naming the problem, on anything else."""
    directory = Path(directory)
    card = read_card(directory) if card is None else card
    section = card.get("calibration")
    if section is None:
        return None
    where = directory / CARD_FILE
    if not isinstance(section, dict) or not isinstance(section.get("file"), str) or not section.get("sha256"):
        raise CalibrationError(f"{where}: the calibration section needs 'file' and 'sha256'")
    path = directory / section["file"]
    if path.name != section["file"] or not path.is_file():
        raise CalibrationError(
            f"{directory} is missing its calibration file {section['file']!r} (re-run `python -m model.calibrate`)"
        )
    data = path.read_bytes()  # the bytes hashed are the bytes parsed
    if hashlib.sha256(data).hexdigest() != section["sha256"]:
        raise CalibrationError(f"{path} does not match its card's sha256 (corrupt, truncated or replaced)")
    try:
        tensors = load_bytes(data)
        # load() returns no metadata; the header it has just validated is a u64 length, then JSON
        metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own error types on a malformed header
        raise CalibrationError(f"{path} is not a readable safetensors file: {e}") from None
    if sorted(tensors) != sorted(TENSORS) or sorted(metadata) != sorted(METADATA):
        raise CalibrationError(
            f"{path}: expected tensors {list(TENSORS)} and metadata {list(METADATA)}, "
            f"got {sorted(tensors)} and {sorted(metadata)}"
        )
    if metadata["format_version"] != str(FORMAT_VERSION):
        raise CalibrationError(
            f"{path}: unknown calibration format_version {metadata['format_version']!r} "
            f"(this version of vae-serve reads {FORMAT_VERSION})"
        )
    weights_sha = (card.get("weights") or {}).get("sha256")
    if metadata["weights_sha256"] != weights_sha:
        raise CalibrationError(
            f"{path} was computed for other weights (sha256 {metadata['weights_sha256'][:12]}...,"
            f" the checkpoint has {str(weights_sha)[:12]}...): re-run `python -m model.calibrate`"
        )
    try:
        return Calibration(
            statistics=tuple(json.loads(metadata["statistics"])),
            mean=tensors["mean"],
            covariance=tensors["covariance"],
            reference_scores=tensors["reference_scores"],
            k=int(metadata["k"]),
            binarized=bool(json.loads(metadata["binarized"])),
            weights_sha256=metadata["weights_sha256"],
            info=json.loads(metadata["info"]),
        )
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise CalibrationError(f"{path}: bad calibration: {e}") from None


def created_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
