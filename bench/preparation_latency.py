"""What the preparation phase takes off the trainer pod: its time before the first step, with and without prepared data.

For the demo dataset and one 10x larger, side by side in one process tree, on a real S3 endpoint (moto):

- in-trainer: ``python -m kubetune_trainer`` tokenizes and packs itself (what a pod without the phase does);
- prepared: ``python -m kubetune_trainer prepare`` first (the CPU Job), then the trainer loads its file.

Per case it prints the trainer's pre-step time (process start to "training started"), the seconds it spent on
its data (result.dataSeconds), the preparation step's own time, and the ratios. Target: the prepared trainer's
pre-step time is lower by at least the tokenization time. On a cluster, apply-to-first-step adds scheduling and
image start to both; the preparation Job runs while no GPU is held.

    python bench/preparation_latency.py [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from localcluster.s3 import MotoS3Server, free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "examples" / "data" / "memorise.jsonl"


def write_larger(source: Path, target: Path, factor: int) -> Path:
    """``factor`` copies of every record, each copy numbered so that no two records are the same."""
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    with target.open("w", encoding="utf-8") as out:
        for copy in range(factor):
            for record in records:
                out.write(json.dumps({"text": f"{record['text']} ({copy})"}) + "\n")
    return target


def config(model: Path, data: Path, bucket: str, endpoint: str, work: Path, steps: int, cache_uri: str | None) -> dict[str, Any]:
    runtime: dict[str, Any] = {
        "namespace": "bench",
        "jobName": "prep",
        "workDir": str(work),
        "terminationMessagePath": str(work / "termination-log"),
        "metricsPort": free_port(),
    }
    if cache_uri:
        runtime["preparation"] = {"cacheUri": cache_uri}
    return {
        "model": {"source": str(model)},
        "dataset": {"source": str(data), "maxSeqLength": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": steps, "perDeviceBatchSize": 4, "logEvery": 1, "checkpointEvery": 1000, "gradientCheckpointing": False},
        "output": {"bucket": bucket, "prefix": "runs", "endpointUrl": endpoint, "region": "us-east-1"},
        "runtime": runtime,
    }


def run(document: dict[str, Any], env: dict[str, str], mode: str) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
    """(wall seconds, termination message, JSON log events) of one trainer process."""
    work = Path(document["runtime"]["workDir"])
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"config-{mode}.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    began = time.time()
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer", mode, "--config", str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - began
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed ({done.returncode}): {done.stderr[-2000:]}")
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    message = json.loads(Path(document["runtime"]["terminationMessagePath"]).read_text())
    return wall, message | {"_began": began}, events


def pre_step_seconds(message: dict[str, Any], events: list[dict[str, Any]]) -> float:
    started = next(e for e in events if e.get("msg") == "training started")
    return datetime.fromisoformat(started["time"]).timestamp() - float(message["_began"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--factor", type=int, default=10, help="How much larger the second dataset is.")
    args = parser.parse_args(argv)
    import tinymodel

    with tempfile.TemporaryDirectory(prefix="prep-bench-") as scratch, MotoS3Server() as s3:
        root = Path(scratch)
        model = tinymodel.build(root / "model", "tiny", seed=0)
        bucket = s3.create_bucket()
        env = (
            {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_"))}
            | s3.env()
            | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        )
        datasets = {"demo": DEMO_DATA, f"{args.factor}x": write_larger(DEMO_DATA, root / "larger.jsonl", args.factor)}
        header = f"{'dataset':<8} {'records':>8} {'in-trainer pre-step':>20} {'prepared pre-step':>18} {'ratio':>6}"
        print(f"{header} {'tokenize s':>11} {'load s':>7} {'prepare s':>10}")
        for name, data in datasets.items():
            alone = config(model, data, bucket, s3.endpoint_url, root / name / "alone", args.steps, None)
            _, alone_message, alone_events = run(alone, env, "train")
            prepare = config(model, data, bucket, s3.endpoint_url, root / name / "prepare", args.steps, None)
            prepare_wall, prepared_message, _ = run(prepare, env, "prepare")
            uri = prepared_message["preparation"]["cacheUri"]
            loading = config(model, data, bucket, s3.endpoint_url, root / name / "loading", args.steps, uri)
            _, loading_message, loading_events = run(loading, env, "train")
            before, after = pre_step_seconds(alone_message, alone_events), pre_step_seconds(loading_message, loading_events)
            tokenize, load = alone_message["result"]["dataSeconds"], loading_message["result"]["dataSeconds"]
            records = prepared_message["preparation"]["data"]["trainRecords"]
            print(f"{name:<8} {records:>8} {before:>19.2f}s {after:>17.2f}s {after / before:>6.2f} {tokenize:>11.2f} {load:>7.2f} {prepare_wall:>10.2f}")
            print(f"         pre-step time saved {before - after:.2f}s against {tokenize - load:.2f}s of tokenizing moved off the trainer pod")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
