"""service.metrics: the batch series, looked up once per model and op, count every batch in its own series."""

from __future__ import annotations

from prometheus_client import generate_latest

from service.metrics import Metrics


def test_each_model_and_op_counts_its_own_batches() -> None:
    m = Metrics()
    m.batch("a", "encode", 3, 0.01)
    m.batch("a", "encode", 3, 0.03)
    m.batch("a", "decode", 1, 0.02)
    m.batch("b", "encode", 2, 0.5)
    text = generate_latest(m.registry).decode()
    assert 'vae_images_processed_total{model="a",op="encode"} 6.0' in text
    assert 'vae_images_processed_total{model="a",op="decode"} 1.0' in text
    assert 'vae_images_processed_total{model="b",op="encode"} 2.0' in text
    assert 'vae_batch_size_count{model="a",op="encode"} 2.0' in text
    assert 'vae_batch_size_sum{model="a",op="encode"} 6.0' in text
    assert 'vae_forward_duration_seconds_sum{model="a",op="encode"} 0.04' in text
    assert 'vae_forward_duration_seconds_bucket{le="0.025",model="a",op="encode"} 1.0' in text
    assert 'vae_forward_duration_seconds_count{model="b",op="encode"} 1.0' in text
