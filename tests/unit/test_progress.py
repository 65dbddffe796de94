"""Reading a trainer's progress from its Prometheus endpoint (served for real on loopback)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from kubetune_operator.progress import ScrapeError, fetch_metrics, parse_metrics, scrape

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 27, 8, 0, 0, 123456, tzinfo=UTC)
LABELS = {"namespace": "team-a", "finetunejob": "llama"}


def trainer_registry(step: int = 42, total: int = 100, tokens_per_second: float = 2500.0, gpus: int = 2) -> CollectorRegistry:
    """A registry exposing the metric names of the trainer contract, as the trainer publishes them."""
    registry = CollectorRegistry()
    names = list(LABELS)

    def gauge(name: str, value: float) -> None:
        Gauge(f"kubetune_trainer_{name}", name, names, registry=registry).labels(**LABELS).set(value)

    gauge("step", step)
    gauge("total_steps", total)
    gauge("epoch", 0.42)
    gauge("progress_ratio", step / total)
    gauge("loss", 1.5)
    gauge("eval_loss", 1.75)
    gauge("learning_rate", 2e-4)
    gauge("tokens_per_second", tokens_per_second)
    gauge("eta_seconds", 600)
    gauge("last_checkpoint_step", 40)
    Counter("kubetune_trainer_tokens", "tokens", names, registry=registry).labels(**LABELS).inc(12345)
    Histogram("kubetune_trainer_checkpoint_save_seconds", "save", names, registry=registry).labels(**LABELS).observe(1.2)
    memory = Gauge("kubetune_trainer_gpu_memory_allocated_bytes", "vram", [*names, "gpu"], registry=registry)
    for gpu in range(gpus):
        memory.labels(**LABELS, gpu=str(gpu)).set(1e9 * (gpu + 1))
    Gauge("kubetune_trainer_info", "info", [*names, "method", "base_model"], registry=registry).labels(**LABELS, method="lora", base_model="tiny").set(1)
    return registry


def text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_parse_fills_progress_from_rank_zero() -> None:
    sample = parse_metrics([text(trainer_registry())], NOW)
    assert sample is not None
    progress = sample.progress
    assert (progress.step, progress.total_steps, progress.percent) == (42, 100, 42)
    assert progress.loss == 1.5 and progress.eval_loss == 1.75
    assert progress.learning_rate == pytest.approx(2e-4)
    assert progress.epoch == pytest.approx(0.42)
    assert progress.eta_seconds == 600
    assert progress.tokens_per_second == 2500.0
    assert progress.last_update_time == NOW.replace(microsecond=0)
    assert sample.last_checkpoint_step == 40


def test_throughput_is_summed_over_pods_and_steps_come_from_rank_zero() -> None:
    texts = [text(trainer_registry(step=10, tokens_per_second=1000.0)), text(trainer_registry(step=9, tokens_per_second=900.0))]
    sample = parse_metrics(texts, NOW)
    assert sample is not None
    assert sample.progress.step == 10
    assert sample.progress.tokens_per_second == 1900.0


def test_percent_falls_back_to_step_over_total_and_is_capped() -> None:
    exposition = "kubetune_trainer_step 150\nkubetune_trainer_total_steps 100\n"
    sample = parse_metrics([exposition], NOW)
    assert sample is not None and sample.progress.percent == 100


def test_a_trainer_still_loading_has_no_progress_yet() -> None:
    assert parse_metrics(["kubetune_trainer_resident_memory_bytes 1e9\n"], NOW) is None
    assert parse_metrics([], NOW) is None


def test_garbage_is_a_scrape_error() -> None:
    with pytest.raises(ScrapeError):
        parse_metrics(["this is { not prometheus"], NOW)


@pytest.fixture
def trainer_endpoint() -> Iterator[int]:
    server, thread = start_http_server(0, addr="127.0.0.1", registry=trainer_registry(step=7, total=70))
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_scrape_reads_a_real_endpoint(trainer_endpoint: int) -> None:
    assert "kubetune_trainer_step" in fetch_metrics("127.0.0.1", trainer_endpoint, timeout=2)
    sample = scrape(["127.0.0.1"], trainer_endpoint, 2.0, NOW)
    assert sample is not None
    assert (sample.progress.step, sample.progress.percent) == (7, 10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_scrape_of_a_closed_port_fails_for_rank_zero_and_skips_other_ranks(trainer_endpoint: int) -> None:
    closed = free_port()
    with pytest.raises(ScrapeError):
        scrape(["127.0.0.1"], closed, 0.5, NOW)
    # Rank 1 answers on another address than rank 0; when it does not answer, rank 0's figures stand.
    sample = scrape(["127.0.0.1", "127.0.0.2"], trainer_endpoint, 0.5, NOW)
    assert sample is not None and sample.progress.step == 7
