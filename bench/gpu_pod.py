"""A FinetuneJob through the real pod path on this machine: operator builders -> Job -> pod -> trainer (-> CUDA).

    python bench/gpu_pod.py bench/jobs/qlora-1b-gpu.yaml --shape 1b --out bench/results/gpu-pod.json   # on a GPU
    python bench/gpu_pod.py examples/tiny-cpu-qlora.yaml --shape tiny --max-steps 6                 # on a CPU

The FinetuneJob YAML (Secrets may follow it in the same file) is built into its ConfigMap and Job(s) by the operator's
own ``manifests.build_children``; each Job's pod runs as the local cluster's node agent runs pods (bench/_pod_node.py):
volumes as per-pod folders, the container command with the pod's environment, the termination message. The base model
(random weights of ``--shape``) and a small dataset are put into a local S3 endpoint (moto) that the spec is pointed at.
While the trainer runs, the operator's progress reader scrapes its /metrics and the operator's status function computes
the phase from what was seen; at the end the adapter is verified in S3 and, on a GPU, the per-GPU series are checked.
Prints one JSON report (``--out`` also writes it) and exits 1 unless every check passed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._pod_node import LocalObjects, PodRun, job_with_status, pod_of, run_pod  # noqa: E402
from kubetune_api.fit import GpuMemorySource  # noqa: E402
from kubetune_api.metrics import TrainerMetric  # noqa: E402
from kubetune_api.runtime import TrainerEnvironment  # noqa: E402
from kubetune_operator import manifests, progress  # noqa: E402
from kubetune_operator.api import FinetuneJob  # noqa: E402
from kubetune_operator.settings import OperatorSettings  # noqa: E402
from kubetune_operator.status import Observed, compute_status  # noqa: E402
from kubetune_operator.verdict import preparation_report  # noqa: E402
from localcluster.s3 import MotoS3Server, free_port  # noqa: E402

Obj = dict[str, Any]
DATA_KEY = "datasets/gpu-pod.jsonl"
MODEL_PREFIX = "models/gpu-pod"


def build_model(shape: str, out: Path) -> None:
    """Random weights of ``shape`` with the tiny model's tokenizer, in a subprocess so this one never holds the GPU."""
    code = (
        "import sys, tinymodel; from pathlib import Path; out = Path(sys.argv[2]); tinymodel.build(out, 'tiny', seed=0)\n"
        "if sys.argv[1] != 'tiny':\n"
        "    import torch; from bench.gpu_report import build_random_llama\n"
        "    for f in out.glob('*.safetensors'): f.unlink()\n"
        "    (out / 'config.json').unlink()\n"
        "    build_random_llama(out, sys.argv[1], 'cuda' if torch.cuda.is_available() else 'cpu')\n"
    )
    subprocess.run([sys.executable, "-c", code, shape, str(out)], cwd=REPO, check=True)


def stage_inputs(server: MotoS3Server, body: Obj, shape: str, work: Path, records: int) -> None:
    """Model and data into the bucket of spec.output, and the spec pointed at them and at this endpoint."""
    import tinymodel

    spec = body["spec"]
    bucket = spec["output"]["bucket"]
    server.create_bucket(bucket)
    client = server.client()
    model_dir = work / "model"
    build_model(shape, model_dir)
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{MODEL_PREFIX}/{path.relative_to(model_dir)}")
    lines = tinymodel.corpus_lines()
    data = "".join(json.dumps({"text": lines[i % len(lines)]}) + "\n" for i in range(records))
    client.put_object(Bucket=bucket, Key=DATA_KEY, Body=data.encode())
    spec["model"]["source"] = f"s3://{bucket}/{MODEL_PREFIX}/"
    spec["dataset"]["source"] = f"s3://{bucket}/{DATA_KEY}"
    spec["output"]["endpointUrl"] = server.endpoint_url
    spec["output"]["region"] = server.env()["AWS_DEFAULT_REGION"]


def credentials_secret(server: MotoS3Server, body: Obj) -> Obj | None:
    """The Secret spec.output.credentialsSecret names, holding this endpoint's keys."""
    ref = body["spec"]["output"].get("credentialsSecret")
    if not ref:
        return None
    env = server.env()
    keys = {
        ref.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"): env["AWS_ACCESS_KEY_ID"],
        ref.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"): env["AWS_SECRET_ACCESS_KEY"],
    }
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": ref["name"]}, "stringData": keys}


def gpu_memory() -> manifests.GpuMemory | None:
    """This machine's GPU memory, as a node label would tell the operator (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory), GpuMemorySource.NODE_LABEL


class Watcher:
    """The operator's view of one running pod: its progress read from /metrics, the status computed from it."""

    def __init__(self, ftj: FinetuneJob, job: Obj, port: int) -> None:
        self.ftj, self.job, self.port = ftj, job, port
        self.statuses: list[Obj] = []
        self.last_text = ""
        self.scrape_errors = 0
        self.samples: list[progress.TrainerSample] = []

    def status(self, pod: Obj, sample: progress.TrainerSample | None) -> Obj:
        previous = self.statuses[-1] if self.statuses else None
        ftj = FinetuneJob.from_body({**self.ftj.model_dump(by_alias=True, mode="json", exclude_none=True), "status": previous})
        status = compute_status(ftj, Observed(now=datetime.now(UTC), job=job_with_status(self.job, pod), pods=[pod], sample=sample))
        self.statuses.append(status)
        return status

    def __call__(self, pod: Obj) -> None:
        sample = None
        try:
            text = progress.fetch_metrics(pod["status"]["podIP"], self.port, timeout=2.0)
            sample = progress.parse_metrics([text], datetime.now(UTC))
            self.last_text = text
            if sample is not None:
                self.samples.append(sample)
        except progress.ScrapeError:
            self.scrape_errors += 1
        self.status(pod, sample)


def gpu_series(text: str) -> dict[str, dict[str, float]]:
    """The per-GPU series of a /metrics text: name -> gpu label -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "gpu" in sample.labels:
                found.setdefault(sample.name, {})[sample.labels["gpu"]] = sample.value
    return found


def verify_adapter(uri: str, body: Obj, server: MotoS3Server) -> bool:
    from kubetune_api.output import OutputSpec
    from kubetune_trainer.storage.publish import verify_publication
    from kubetune_trainer.storage.store import S3Store

    store = S3Store.from_output(OutputSpec.model_validate(body["spec"]["output"]), environment=TrainerEnvironment.model_validate(server.env()))
    return verify_publication(store, uri, deep=True)


def run(args: argparse.Namespace) -> Obj:
    docs = [d for d in yaml.safe_load_all(Path(args.job).read_text()) if d]
    body = next(d for d in docs if d.get("kind") == "FinetuneJob")
    namespace = body["metadata"].setdefault("namespace", "default")
    body["metadata"].update(uid=body["metadata"].get("uid") or "0b5e55ed-gpu-pod", generation=1, creationTimestamp=manifests_timestamp())
    if args.max_steps:
        body["spec"]["training"]["maxSteps"] = args.max_steps
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kubetune-gpu-pod-"))
    report: Obj = {"case": f"pod-{body['spec'].get('method', 'lora')}-{args.shape}", "job": str(args.job), "checks": {}}
    with MotoS3Server() as server:
        server.start()
        stage_inputs(server, body, args.shape, work, args.records)
        objects = LocalObjects()
        for doc in [*docs, credentials_secret(server, body)]:
            if doc is not None and doc.get("kind") == "Secret":
                objects.add(doc, namespace)
        ftj = FinetuneJob.from_body(body)
        settings = OperatorSettings(trainer_metrics_port=free_port())
        gpus = ftj.spec.resources.gpus
        allocatable = {"cpu": "16", "memory": "128Gi", "pods": "10", ftj.spec.resources.gpu_resource_name: str(max(gpus, 1))}
        memory = gpu_memory() if gpus > 0 else None
        preparation = None
        if ftj.spec.prepares_in_job():
            prepare = pod_phase_run(manifests.build_children(ftj, settings, None, memory), "prepare", objects, namespace, work, allocatable, None)
            report["prepare_exit_code"] = prepare.exit_code
            preparation = preparation_report([prepare.pod])
            if preparation is None:
                raise SystemExit(f"the preparation pod wrote no report (exit {prepare.exit_code}):\n{prepare.log[-3000:]}")
        children = manifests.build_children(ftj, settings, preparation, memory)
        job = next(c for c in children if c["kind"] == "Job" and c["metadata"]["name"] == manifests.job_name(ftj.metadata.name))
        watcher = Watcher(ftj, job, settings.trainer_metrics_port)
        trained = pod_phase_run(children, "train", objects, namespace, work, allocatable, watcher)
        final = watcher.status(trained.pod, None)
        report.update(evaluate(final, watcher, trained, body, server, gpus))
    return report


def manifests_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_phase_run(
    children: list[Obj], what: str, objects: LocalObjects, namespace: str, work: Path, allocatable: dict[str, str], watcher: Watcher | None
) -> PodRun:
    """Run the one pod of the last Job among ``children`` (the preparation Job or the trainer Job)."""
    for child in children:
        if child["kind"] in ("ConfigMap", "Secret"):
            objects.add(child, namespace)
    job = [c for c in children if c["kind"] == "Job"][-1]
    pod = pod_of(job, 0)
    return run_pod(pod, objects, work / "pods" / what, allocatable, watcher or (lambda _: None))


def evaluate(final: Obj, watcher: Watcher, trained: PodRun, body: Obj, server: MotoS3Server, gpus: int) -> Obj:
    result = final.get("result") or {}
    phases = [s.get("phase") for s in watcher.statuses]
    # Progress the operator read from the live trainer's /metrics, not what the final result reports.
    progressed = [s.progress for s in watcher.samples if s.progress.step > 0]
    series = gpu_series(watcher.last_text)
    checks: dict[str, bool] = {
        "exit_code_zero": trained.exit_code == 0,
        "status_succeeded": final.get("phase") == "Succeeded",
        "running_seen": "Running" in phases,
        "progress_scraped": bool(progressed),
        "result_has_adapter": bool(result.get("adapterUri")),
    }
    checks["adapter_verified"] = checks["result_has_adapter"] and verify_adapter(result["adapterUri"], body, server)
    if gpus > 0:
        allocated = series.get(TrainerMetric.GPU_MEMORY_ALLOCATED, {})
        total = series.get(TrainerMetric.GPU_MEMORY_TOTAL, {})
        checks["vram_series_every_gpu"] = all(allocated.get(str(g), 0) > 0 and total.get(str(g), 0) > 0 for g in range(gpus))
        used = series.get(TrainerMetric.GPU_MEMORY_USED, {})
        # NVML's device-wide use includes the CUDA context, so it is never below what torch's allocator reserved.
        reserved = series.get(TrainerMetric.GPU_MEMORY_RESERVED, {})
        checks["nvml_covers_torch"] = all(used.get(g, 0) >= reserved.get(g, 0) for g in reserved) and bool(used)
    else:
        checks["no_gpu_series_on_cpu"] = not series
    rates = [p.tokens_per_second for p in progressed if p.tokens_per_second]
    peak = result.get("peakMemoryBytes")
    return {
        "checks": checks,
        "ok": all(checks.values()),
        "phases_seen": sorted({p for p in phases if p}),
        "scrapes": len(watcher.statuses) - 1,
        "scrape_errors": watcher.scrape_errors,
        "phase": final.get("phase"),
        "message": final.get("message"),
        "result": result,
        "tokens_per_second": rates[-1] if rates else None,
        "peak_vram_gib": round(peak / 1024**3, 2) if peak and gpus > 0 else None,
        "gpu_series": series,
        "log_tail": "" if trained.exit_code == 0 else trained.log[-3000:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="FinetuneJob YAML (Secrets may follow in the same file)")
    parser.add_argument("--shape", choices=("tiny", "1b", "8b"), default="tiny", help="random base model to train")
    parser.add_argument("--max-steps", type=int, default=0, help="override spec.training.maxSteps")
    parser.add_argument("--records", type=int, default=64, help="text records in the dataset")
    parser.add_argument("--workdir", default="", help="where pod folders and the model go (a temporary folder by default)")
    parser.add_argument("--out", default="", help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=1, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
