"""bench/anomaly.py: its AUROC and FPR@95%TPR on known inputs, and one quick run on the shipped Fashion-MNIST model
(skipped without ../shared/data)."""

from pathlib import Path

import pytest
import torch

from bench import anomaly

REPO = Path(__file__).resolve().parents[1]


def test_auroc_and_fpr_at_95_tpr_on_known_scores() -> None:
    inside = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert anomaly.auroc(inside, inside + 10) == 1.0 and anomaly.auroc(inside + 10, inside) == 0.0
    assert anomaly.auroc(inside, inside) == 0.5  # every pair ties or splits evenly
    assert anomaly.fpr_at_tpr(inside, inside + 10) == 0.0
    # The threshold that keeps 95 % of 20 OOD scores (1..20) is 2: the in-distribution scores 2 and 3 pass it.
    assert anomaly.fpr_at_tpr(inside, torch.arange(1.0, 21.0)) == 0.5


@pytest.mark.slow
def test_a_quick_run_on_the_shipped_fashion_mnist_model(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    anomaly.main(
        [
            str(REPO / "checkpoints" / "fashion-mnist"),
            "--data-root",
            str(shared_data),
            "--n",
            "12",
            "--k",
            "2",
            "--rounds",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "| fashion-mnist | MNIST digits |" in out and "| fashion-mnist | constant images |" in out
    assert "calibration stored (5000 held-out images, k=100)" in out
    assert "| fashion-mnist | 64 | 2 |" in out  # the cost table
