"""Trainer benchmark: kubetune's training throughput against its peers, and its own overhead.

Builds the ~30M-parameter Llama-shaped random model (``python -m tinymodel --preset bench``)
and a deterministic dataset of text records of very different lengths, then trains LoRA (r=16,
every linear layer) with the same model, data, sequence length, batch, precision, optimizer,
number of steps and seed in each contender, one process each:

- kubetune: ``python -m kubetune_trainer --config FILE`` as the pod runs it: packing, metrics
  server on (scraped while it trains), checkpoints uploaded to a real S3 endpoint (moto) every
  ``--checkpoint-every`` steps. Throughput comes from its JSON progress log lines.
- hf-padded: transformers Trainer + peft with a padding collator, one record per row.
- trl-packed: TRL SFTTrainer with packing (only when ``trl`` is importable).
- bare: a plain torch loop on kubetune's own packed batches, with no metrics, logs or checkpoints.
- kubetune-no-ckpt (on request): kubetune with no checkpoint in the run, to split the overhead.

All count real (non-padding) tokens of the steps after the first log interval (loading and
warm-up excluded the same way). Rounds alternate the order (A B C D, D C B A, ...) because the
machine is shared; the table gives the median and the spread over rounds, and kubetune's note
splits its log intervals into those with and without a checkpoint save or upload in flight. On
CPU each contender gets ``--threads`` threads (1 by default, see its help).

    python bench/trainer_throughput.py [--steps 10] [--seq-len 256] [--batch-size 2] [--rounds 2]

Targets (DESIGN.md): kubetune at least as fast as the best peer; overhead = 1 - kubetune / bare <= 3%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from kubetune_api.result import TerminationMessage
from localcluster.s3 import MotoS3Server, free_port

# Run as a script, only bench/ itself is on the path; its sibling modules are imported as the bench package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._throughput_common import ROOT, Measurement, Settings, write_dataset

PEERS = ("hf-padded", "trl-packed", "bare")
KUBETUNE_VARIANTS = ("kubetune", "kubetune-no-ckpt")
OVERHEAD_TARGET = 0.03


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def child_env(extra: dict[str, str] | None = None, threads: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    if threads > 0:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {**env, **(extra or {})}


def build_model(out: Path) -> Path:
    if not (out / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "tinymodel", "--preset", "bench", "--out", str(out)],
            check=True,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return out


# ---- kubetune ---------------------------------------------------------------------------------


def kubetune_config(settings: Settings, s3: MotoS3Server, bucket: str, work: Path, job: str) -> dict[str, Any]:
    return {
        "model": {"source": settings.model_dir},
        "dataset": {"source": settings.data_path, "format": "text", "maxSeqLength": settings.seq_len, "packing": True},
        "method": "lora",
        "lora": {"r": settings.lora_r, "alpha": settings.lora_alpha, "dropout": settings.lora_dropout, "targetModules": ["all-linear"]},
        "training": {
            "maxSteps": settings.steps,
            "learningRate": settings.learning_rate,
            "scheduler": "cosine",
            "warmupSteps": 0,
            "perDeviceBatchSize": settings.batch_size,
            "gradientAccumulationSteps": settings.grad_accum,
            "gradientCheckpointing": False,
            "precision": "auto",
            "optimizer": "adamw",
            "maxGradNorm": 1.0,
            "seed": settings.seed,
            "checkpointEvery": settings.checkpoint_every,
            "logEvery": settings.log_every,
        },
        "output": {"bucket": bucket, "prefix": "bench", "endpointUrl": s3.endpoint_url, "region": "us-east-1"},
        "runtime": {
            "namespace": "bench",
            "jobName": job,
            "gpusPerNode": 1 if settings.cuda else 0,
            "metricsPort": free_port(),
            "workDir": str(work / "work"),
            "terminationMessagePath": str(work / "termination-log"),
        },
    }


class Scraper:
    """Reads /metrics every ``interval`` seconds while the trainer runs, as Prometheus would."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.done = threading.Event()
        self.scrapes = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.done.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                continue

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def run_kubetune(
    settings: Settings, s3: MotoS3Server, bucket: str, tmp: Path, job: str, scrape_interval: float, threads: int, *, checkpoints: bool = True
) -> Measurement:
    work = tmp / job
    work.mkdir(parents=True)
    config = kubetune_config(settings, s3, bucket, work, job)
    if not checkpoints:
        # Past the last step: the run saves none, which isolates the cost of checkpointing.
        config["training"]["checkpointEvery"] = settings.steps + 1
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    env = child_env({**s3.env(), "KUBETUNE_METRICS_HOST": "127.0.0.1", "KUBETUNE_POD_NAME": job}, threads)
    with Scraper(config["runtime"]["metricsPort"], scrape_interval) as scraper:
        proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(config_path)], env=env, capture_output=True, text=True)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise RuntimeError(f"kubetune exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    progress = [e for e in events if e.get("msg") == "progress"]
    # A checkpoint is busy from its save (right after the log line of its step) until its upload ends.
    busy = [
        (_time(saved), _time(done)) for saved, done in zip(_named(events, "progress", "checkpoint saved"), _named(events, "checkpoint uploaded"), strict=False)
    ]
    totals = {"all": [0, 0.0], "clean": [0, 0.0], "checkpoint": [0, 0.0]}
    # The first interval holds the warm-up; each later one covers log_every steps, including the
    # on_log hook, the checkpoint save and the background upload that ran during it.
    for before, after in zip(progress, progress[1:], strict=False):
        interval = int(after["tokens"]) - int(before["tokens"])
        seconds = interval / float(after["tokens_per_second"])
        start, end = _time(before), _time(after)
        kind = "checkpoint" if any(s <= end and e >= start for s, e in busy) else "clean"
        for key in ("all", kind):
            totals[key][0] += interval
            totals[key][1] += seconds
    steps = int(progress[-1]["step"]) - int(progress[0]["step"]) if progress else 0
    message = TerminationMessage.decode((work / "termination-log").read_text(encoding="utf-8"))
    if message is None or message.result is None or not message.result.tokens or not message.result.duration_seconds:
        raise RuntimeError(f"kubetune wrote no result with tokens and duration to its termination message:\n{proc.stderr[-3000:]}")
    whole = message.result.tokens / message.result.duration_seconds
    rates = {key: (t / s if s else float("nan")) for key, (t, s) in totals.items()}
    note = (
        f"{len(busy)} checkpoints, {scraper.scrapes} scrapes; intervals without/with a checkpoint save or upload: "
        f"{rates['clean']:.0f}/{rates['checkpoint']:.0f} tok/s; whole run incl. loading {whole:.0f} tok/s"
    )
    name = "kubetune" if checkpoints else "kubetune-no-ckpt"
    return Measurement(name, int(totals["all"][0]), float(totals["all"][1]), steps, note)


def _named(events: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    """The events with message ``names[-1]``; with two names, the ``names[0]`` event logged just before each."""
    if len(names) == 1:
        return [e for e in events if e.get("msg") == names[0]]
    found = []
    for index, event in enumerate(events):
        if event.get("msg") == names[1]:
            earlier = [e for e in events[:index] if e.get("msg") == names[0]]
            found.append(earlier[-1] if earlier else event)
    return found


def _time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


# ---- peers ------------------------------------------------------------------------------------


def run_peer(name: str, settings_path: Path, tmp: Path, tag: str, threads: int) -> Measurement:
    out = tmp / f"{name}-{tag}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "_throughput_peers.py"), name, str(settings_path), str(out)],
        env=child_env(threads=threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return Measurement.load(out)


# ---- report -----------------------------------------------------------------------------------


def summarise(results: dict[str, list[Measurement]]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, runs in results.items():
        rates = [m.tokens_per_second for m in runs]
        rows[name] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates, "note": runs[-1].note}
    kubetune = rows["kubetune"]["median"]
    for row in rows.values():
        row["ratio_vs_kubetune"] = row["median"] / kubetune if kubetune else float("nan")
    summary: dict[str, Any] = {"contenders": rows}
    peers = [n for n in rows if n in PEERS and n != "bare"]
    if peers:
        best = max(peers, key=lambda n: rows[n]["median"])
        summary["best_peer"] = best
        summary["kubetune_vs_best_peer"] = kubetune / rows[best]["median"]
    if "bare" in results:
        paired = [1 - k.tokens_per_second / b.tokens_per_second for k, b in zip(results["kubetune"], results["bare"], strict=True)]
        summary["overhead"] = 1 - kubetune / rows["bare"]["median"]
        summary["overhead_per_round"] = paired
        if "kubetune-no-ckpt" in rows:
            summary["overhead_without_checkpoints"] = 1 - rows["kubetune-no-ckpt"]["median"] / rows["bare"]["median"]
    return summary


def print_report(settings: Settings, summary: dict[str, Any], rounds: int) -> None:
    rows = summary["contenders"]
    device = "cuda" if settings.cuda else "cpu"
    print(
        f"\nLoRA r={settings.lora_r} all-linear, {device}, seq {settings.seq_len}, micro-batch {settings.batch_size} x accumulation "
        f"{settings.grad_accum}, {settings.steps} steps (first {settings.warmup_steps} excluded), {rounds} rounds, alternating order"
    )
    print(f"{'contender':<12} {'tokens/s':>10} {'min..max':>19} {'vs kubetune':>12}  note")
    for name, row in rows.items():
        spread = f"{row['min']:.0f}..{row['max']:.0f}"
        print(f"{name:<12} {row['median']:>10.1f} {spread:>19} {row['ratio_vs_kubetune']:>11.2f}x  {row['note']}")
    if "best_peer" in summary:
        ratio = summary["kubetune_vs_best_peer"]
        verdict = "met" if ratio >= 1.0 else "NOT met"
        print(f"kubetune / best peer ({summary['best_peer']}): {ratio:.3f}  (target >= 1.0: {verdict})")
    if "overhead" in summary:
        overhead = summary["overhead"]
        per_round = ", ".join(f"{o:+.1%}" for o in summary["overhead_per_round"])
        verdict = "met" if overhead <= OVERHEAD_TARGET else "NOT met"
        print(f"kubetune overhead vs bare loop: {overhead:+.1%} (per round: {per_round}; target <= {OVERHEAD_TARGET:.0%}: {verdict})")
    if "overhead_without_checkpoints" in summary:
        print(f"of which without checkpoints (metrics, logging, loop): {summary['overhead_without_checkpoints']:+.1%}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=10, help="Optimizer steps per run (default: %(default)s).")
    parser.add_argument("--seq-len", type=int, default=256, help="Maximum sequence length (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=2, help="Sequences per micro-batch (default: %(default)s).")
    parser.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step (default: %(default)s).")
    parser.add_argument("--log-every", type=int, default=2, help="kubetune log interval; the first interval is excluded everywhere (default: %(default)s).")
    parser.add_argument("--checkpoint-every", type=int, default=4, help="kubetune checkpoint interval in steps (default: %(default)s).")
    parser.add_argument("--records", type=int, default=3000, help="Text records in the generated dataset (default: %(default)s).")
    parser.add_argument("--rounds", type=int, default=2, help="Runs per contender, order alternating (default: %(default)s).")
    parser.add_argument(
        "--contenders",
        default="kubetune,hf-padded,trl-packed,bare",
        help="Comma list; kubetune-no-ckpt (kubetune without checkpoints) splits the overhead (default: %(default)s).",
    )
    parser.add_argument("--scrape-interval", type=float, default=5.0, help="Seconds between /metrics scrapes of kubetune (default: %(default)s).")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "CPU threads per contender (OMP_NUM_THREADS); 0 keeps torch's default. One thread keeps runs comparable on a "
            "shared machine: a multi-threaded step stalls whenever any of its threads is descheduled (default: %(default)s)."
        ),
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench", help="Where the model is built once (default: %(default)s).")
    parser.add_argument("--out", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args(argv)
    if args.steps <= args.log_every:
        parser.error("--steps must exceed --log-every: the first log interval is excluded from the measurement")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if "kubetune" not in contenders:
        contenders.insert(0, "kubetune")
    if "trl-packed" in contenders and not trl_available():
        print("trl is not installed: skipping the TRL SFTTrainer contender", file=sys.stderr)
        contenders.remove("trl-packed")
    unknown = set(contenders) - {*KUBETUNE_VARIANTS, *PEERS}
    if unknown:
        print(f"unknown contenders: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    model_dir = build_model(args.cache / "model-bench")
    results: dict[str, list[Measurement]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp_name, MotoS3Server() as s3:
        tmp = Path(tmp_name)
        data = write_dataset(tmp / "records.jsonl", args.records, args.seed)
        settings = Settings(
            model_dir=str(model_dir),
            data_path=str(data),
            steps=args.steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            learning_rate=2e-4,
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            cuda=cuda_available(),
        )
        settings_path = tmp / "settings.json"
        settings_path.write_text(settings.to_json(), encoding="utf-8")
        bucket = s3.create_bucket("kubetune-bench")
        threads = 0 if settings.cuda else args.threads
        for round_index in range(args.rounds):
            order = contenders if round_index % 2 == 0 else list(reversed(contenders))
            for name in order:
                began = time.monotonic()
                if name in KUBETUNE_VARIANTS:
                    measured = run_kubetune(settings, s3, bucket, tmp, f"{name}-{round_index}", args.scrape_interval, threads, checkpoints=name == "kubetune")
                else:
                    measured = run_peer(name, settings_path, tmp, str(round_index), threads)
                results[name].append(measured)
                print(
                    f"round {round_index + 1} {name:<11} {measured.tokens_per_second:8.1f} tok/s "
                    f"({measured.tokens} tokens, {measured.steps} steps, process {time.monotonic() - began:.0f} s)",
                    flush=True,
                )
    summary = summarise(results)
    print_report(settings, summary, args.rounds)
    if args.out is not None:
        args.out.write_text(json.dumps({"settings": json.loads(settings.to_json()), **summary}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
