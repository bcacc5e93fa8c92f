"""model.anomaly: the OOD density, its conformal p-values and decisions, and the calibration file's validation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_bytes

from model import anomaly, checkpoint, losses
from model.anomaly import STATISTICS, CalibrationError
from model.vae import VAE, VAEConfig

CFG = VAEConfig(input_shape=(1, 8, 8), latent_dim=2, hidden_dims=(16,))
CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
SHIPPED = sorted(p.name for p in CHECKPOINTS.iterdir() if (p / checkpoint.CARD_FILE).is_file())


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_stats(n: int, seed: int = 0, shift: float = 0.0) -> dict[str, torch.Tensor]:
    """Correlated Gaussian statistics on each statistic's own scale, like a model's (nats, bits)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(STATISTICS), generator=g, dtype=torch.float64) + shift
    mix = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.3, 1.0, 0.0, 0.0], [0.9, -0.2, 0.5, 0.0], [0.5, 0.1, 0.0, 1.0]], dtype=torch.float64
    )
    scale = torch.tensor([70.0, 3.0, 70.0, 170.0], dtype=torch.float64)
    rows = (z @ mix.T) * scale + torch.tensor([-230.0, 18.0, -212.0, 880.0], dtype=torch.float64)
    return {name: rows[:, i].float() for i, name in enumerate(STATISTICS)}


def fitted(n: int = 400) -> anomaly.Calibration:
    return anomaly.fit(synthetic_stats(n), k=100, binarized=True, weights_sha256="0" * 64)


def same(a: anomaly.Calibration, b: anomaly.Calibration) -> bool:
    tensors = ("mean", "covariance", "reference_scores")
    plain = ("statistics", "k", "binarized", "weights_sha256", "info")
    return all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors) and all(
        getattr(a, f) == getattr(b, f) for f in plain
    )


@pytest.fixture
def calibrated(tmp_path: Path) -> tuple[Path, anomaly.Calibration]:
    """A tiny random VAE checkpoint with a calibration fitted on synthetic statistics for its weights."""
    torch.manual_seed(0)
    card = checkpoint.save(VAE(CFG).eval(), {"name": "t"}, tmp_path / "ckpt")
    cal = anomaly.fit(synthetic_stats(200), k=100, binarized=True, weights_sha256=card["weights"]["sha256"])
    anomaly.save_calibration(cal, tmp_path / "ckpt")
    return tmp_path / "ckpt", cal


# -- scores, p-values, decisions ---------------------------------------------------------------------------------
def test_p_values_lie_in_0_1_and_do_not_increase_with_the_score() -> None:
    cal = fitted()
    scores = (
        torch.cat(
            [
                cal.ood_score(synthetic_stats(300, seed=1)),
                cal.ood_score(synthetic_stats(300, 2, 3.0)),
                torch.tensor([-1e9, 0.0, 1e9], dtype=torch.float64),
            ]
        )
        .sort()
        .values
    )
    p = cal.p_value(scores)
    assert ((p > 0) & (p <= 1)).all()
    assert (p[1:] <= p[:-1]).all()
    assert p[0] == 1.0 and p[-1] == pytest.approx(cal.min_fpr)  # below every reference score; above all of them


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.25])
def test_is_anomaly_flags_about_fpr_of_the_calibration_data(fpr: float) -> None:
    cal = fitted(1000)
    on_reference = (cal.p_value(cal.reference_scores) <= fpr).double().mean().item()
    assert on_reference == pytest.approx(fpr, abs=2 / cal.n)
    # The calibration images themselves, scored by the final fit, and fresh draws of the same distribution.
    for stats in (synthetic_stats(1000), synthetic_stats(4000, seed=7)):
        rate = cal.assess(stats, fpr)["is_anomaly"].double().mean().item()
        assert rate == pytest.approx(fpr, abs=0.35 * fpr + 0.005), rate


def test_shifted_statistics_score_higher_and_get_flagged() -> None:
    cal = fitted()
    inside, outside = cal.assess(synthetic_stats(200, seed=3), 0.01), cal.assess(synthetic_stats(200, 4, 4.0), 0.01)
    assert outside["ood_score"].median() > inside["ood_score"].quantile(0.99)
    assert outside["is_anomaly"].double().mean() > 0.95
    assert set(inside) == {"ood_score", "p_value", "is_anomaly"} and inside["is_anomaly"].dtype == torch.bool


def test_missing_statistic_and_bad_rate_are_clear_errors() -> None:
    cal = fitted()
    stats = synthetic_stats(4)
    with pytest.raises(KeyError, match="complexity_bits"):
        cal.ood_score({k: v for k, v in stats.items() if k != "complexity_bits"})
    with pytest.raises(ValueError, match="false-positive rate"):
        cal.assess(stats, 0.0)


def test_fit_needs_enough_images_and_finite_statistics() -> None:
    with pytest.raises(ValueError, match=f"at least {anomaly.MIN_IMAGES}"):
        anomaly.fit(synthetic_stats(anomaly.MIN_IMAGES - 1), k=1, binarized=True, weights_sha256="")
    stats = synthetic_stats(50)
    stats["kl"][3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        anomaly.fit(stats, k=1, binarized=True, weights_sha256="")


def test_fit_is_deterministic_and_a_small_set_still_gives_a_usable_density() -> None:
    assert same(fitted(), fitted())
    small = anomaly.fit(synthetic_stats(anomaly.MIN_IMAGES), k=1, binarized=False, weights_sha256="")
    assert torch.isfinite(small.ood_score(synthetic_stats(5, seed=9))).all()


# -- the statistics ----------------------------------------------------------------------------------------------
def test_score_statistics_keep_the_service_figures_and_add_complexity() -> None:
    torch.manual_seed(0)
    model = VAE(CFG).eval()
    x = torch.bernoulli(torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    stats = anomaly.score_statistics(model, x, k=7, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        terms = losses.elbo(model, x, generator=g)
        ll = losses.iwae_log_likelihood(model, x, k=7, generator=g)
    assert torch.equal(stats["elbo"], terms.elbo) and torch.equal(stats["kl"], terms.kl)
    assert torch.equal(stats["recon"], terms.recon) and torch.equal(stats["log_likelihood"], ll)
    assert stats["complexity_bits"].shape == (5,) and torch.equal(stats["complexity_bits"], anomaly.complexity_bits(x))


def test_complexity_bits_grows_with_the_input_complexity_and_is_deterministic() -> None:
    noise = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = torch.cat([torch.zeros(1, 1, 28, 28), torch.bernoulli(noise, generator=torch.Generator()), noise])
    bits = anomaly.complexity_bits(x)
    assert bits[0] < bits[1] < bits[2] and bits.dtype == torch.float32
    assert torch.equal(bits, anomaly.complexity_bits(x.clone()))


def test_an_autoencoder_has_no_ood_score_and_says_why() -> None:
    ae = VAE(VAEConfig(input_shape=(1, 8, 8), latent_dim=2, hidden_dims=(16,), kind="ae"))
    reason = anomaly.unsupported_reason(ae.config)
    assert reason and "no likelihood" in reason
    assert anomaly.unsupported_reason(CFG) is None
    with pytest.raises(ValueError, match="no likelihood"):
        anomaly.score_statistics(ae, torch.zeros(1, 1, 8, 8))


# -- storage -----------------------------------------------------------------------------------------------------
def test_calibration_is_stored_and_reloaded_identically(calibrated: tuple[Path, anomaly.Calibration]) -> None:
    path, cal = calibrated
    loaded = anomaly.load_calibration(path)
    assert loaded is not None and same(loaded, cal)
    card = checkpoint.read_card(path)
    section = card["calibration"]
    assert section["file"] == anomaly.CALIBRATION_FILE and section["sha256"] == checkpoint.sha256_file(
        path / anomaly.CALIBRATION_FILE
    )
    assert section["statistics"] == list(STATISTICS) and section["n"] == cal.n and section["k"] == 100
    stats = synthetic_stats(10, seed=5)
    assert torch.equal(loaded.assess(stats, 0.05)["p_value"], cal.assess(stats, 0.05)["p_value"])
    model, _ = checkpoint.load(path)  # the calibrated checkpoint still loads as a model
    assert model.config == CFG


def test_an_uncalibrated_checkpoint_loads_and_has_no_calibration(tmp_path: Path) -> None:
    checkpoint.save(VAE(CFG), {"name": "t"}, tmp_path)
    checkpoint.load(tmp_path)
    assert anomaly.load_calibration(tmp_path) is None
    # A calibration file the card does not name (left over from older weights) is ignored, not trusted.
    (tmp_path / anomaly.CALIBRATION_FILE).write_bytes(b"stale")
    assert anomaly.load_calibration(tmp_path) is None


def rewrite(path: Path, tensors: dict | None = None, metadata: dict | None = None, raw: bytes | None = None) -> None:
    """Replace the calibration file (tensors/metadata patched, or raw bytes) and record its new sha256 in the card,
    so that only the content is wrong."""
    file = path / anomaly.CALIBRATION_FILE
    if raw is None:
        data = file.read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        from safetensors.torch import load as load_bytes

        t = {**load_bytes(data), **(tensors or {})}
        t = {k: v for k, v in t.items() if v is not None}
        meta = {**header["__metadata__"], **(metadata or {})}
        raw = save_bytes(t, metadata={k: v for k, v in meta.items() if v is not None})
    file.write_bytes(raw)
    card = checkpoint.read_card(path)
    card["calibration"]["sha256"] = checkpoint.sha256_file(file)
    checkpoint.write_json_atomic(path / checkpoint.CARD_FILE, card)


CORRUPTIONS = {
    "flipped byte": (None, "does not match its card's sha256"),
    "missing file": (None, "missing its calibration file"),
    "no sha256 in the card": (None, "needs 'file' and 'sha256'"),
    "not safetensors": ({"raw": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"}, "not a readable safetensors"),
    "unknown version": ({"metadata": {"format_version": "9"}}, "unknown calibration format_version '9'"),
    "missing tensor": ({"tensors": {"covariance": None}}, "expected tensors"),
    "extra metadata": ({"metadata": {"extra": "1"}}, "expected tensors .* and metadata"),
    "wrong shape": ({"tensors": {"mean": torch.zeros(3, dtype=torch.float64)}}, r"mean must have shape \(4,\)"),
    "non-finite": (
        {"tensors": {"reference_scores": torch.tensor([1.0, float("nan")], dtype=torch.float64)}},
        "finite",
    ),
    "unsorted": ({"tensors": {"reference_scores": torch.tensor([2.0, 1.0], dtype=torch.float64)}}, "sorted"),
    "not positive definite": ({"tensors": {"covariance": -torch.eye(4, dtype=torch.float64)}}, "positive definite"),
    "float32": ({"tensors": {"mean": torch.zeros(4)}}, "float64"),
    "unknown statistic": ({"metadata": {"statistics": '["log_likelihood", "kl", "recon", "magic"]'}}, "distinct"),
    "bad k": ({"metadata": {"k": "zero"}}, "bad calibration"),
    "other weights": ({"metadata": {"weights_sha256": "f" * 64}}, "computed for other weights"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_calibration_is_rejected_with_a_clear_error(
    calibrated: tuple[Path, anomaly.Calibration], corruption: str
) -> None:
    path, _ = calibrated
    change, message = CORRUPTIONS[corruption]
    file = path / anomaly.CALIBRATION_FILE
    if corruption == "flipped byte":
        data = bytearray(file.read_bytes())
        data[-3] ^= 0xFF
        file.write_bytes(bytes(data))
    elif corruption == "missing file":
        file.unlink()
    elif corruption == "no sha256 in the card":
        card = checkpoint.read_card(path)
        del card["calibration"]["sha256"]
        checkpoint.write_json_atomic(path / checkpoint.CARD_FILE, card)
    else:
        rewrite(path, **change)
    with pytest.raises(CalibrationError, match=message):
        anomaly.load_calibration(path)
    assert issubclass(CalibrationError, checkpoint.CheckpointError)
    checkpoint.load(path)  # the model itself still loads: the caller decides whether to serve it uncalibrated


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_calibrations_are_valid_and_belong_to_their_weights(name: str) -> None:
    card = checkpoint.read_card(CHECKPOINTS / name)
    cal = anomaly.load_calibration(CHECKPOINTS / name, card)
    if name in ("mnist", "fashion-mnist", "frey-face"):
        assert cal is not None, f"checkpoints/{name} has no calibration: run python -m model.calibrate on it"
        assert cal.k == anomaly.DEFAULT_K and cal.n == card["dataset"]["val_images"]
    if card["config"]["kind"] == "ae":
        assert cal is None
