"""A preparation report as the preparation step writes it, for tests of the operator's side."""

from __future__ import annotations

from typing import Any

from kubetune_api.result import DataReport, LengthQuantiles, PreparationReport


def data_report(**overrides: Any) -> DataReport:
    figures: dict[str, Any] = {
        "train_records": 1000,
        "tokens": 250_000,
        "sequences": 130,
        "packing_efficiency": 0.94,
        "steps_per_epoch": 9,
        "total_steps": 9,
        "lengths": LengthQuantiles(p50=200, p90=700, p99=1500, max=2048),
        "dataset_sha256": "ab" * 32,
    }
    return DataReport(**(figures | overrides))


def preparation_report(**overrides: Any) -> PreparationReport:
    fields: dict[str, Any] = {
        "data": data_report(),
        "cache_uri": "s3://adapters/runs/team-a/llama/prepared/0123456789abcdef01234567.npz",
        "cache_key": "0123456789abcdef01234567",
    }
    return PreparationReport(**(fields | overrides))
