"""``kubetune estimate -f job.yaml [--gpu-memory 80Gi]``: the memory breakdown and the fit decision of a FinetuneJob.

Reads the base model's config.json (a local folder, s3:// with spec.output's endpoint and the AWS_* credentials
of the environment, or the Hugging Face hub with HF_TOKEN) and decides with ``kubetune_api.fit``, the code the
preparation step runs for the operator. Exit status: 0 fits, 3 does not fit, 2 the input is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from kubetune_api.estimate import ModelShape, ModelShapeError, format_bytes
from kubetune_api.fit import DEFAULT_HEADROOM, FitDecision, GpuMemorySource, fit, parse_quantity
from kubetune_api.recipe import TrainingRecipe

DEFAULT_GPU_MEMORY = "80Gi"
"""The chart's default for operator.defaultGpuMemory."""
EXIT_FITS, EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT = 0, 2, 3


class InputError(Exception):
    """The FinetuneJob or its model cannot be read; the message says which and what to do."""


def read_job(path: Path) -> tuple[TrainingRecipe, dict[str, Any]]:
    """The recipe and the resources of the FinetuneJob in ``path`` (YAML, the first FinetuneJob document)."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"cannot read {path}: {error}") from error
    job = next((d for d in documents if d.get("kind") == "FinetuneJob"), None)
    if job is None or not isinstance(job.get("spec"), dict):
        raise InputError(f"{path} holds no FinetuneJob with a spec")
    spec = job["spec"]
    aliases = {info.alias or name for name, info in TrainingRecipe.model_fields.items()}
    try:
        recipe = TrainingRecipe.model_validate({k: v for k, v in spec.items() if k in aliases})
    except ValidationError as error:
        problems = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5])
        raise InputError(f"{path}: {problems}") from error
    return recipe, dict(spec.get("resources") or {})


def model_config(recipe: TrainingRecipe) -> dict[str, Any]:
    """The base model's config.json, from where spec.model.source says."""
    source = recipe.model.source
    if source.startswith("s3://"):
        return _s3_config(recipe)
    if source.startswith("/") or source.startswith("."):
        path = Path(source) / "config.json"
        if not path.is_file():
            raise InputError(f"spec.model.source: no config.json in {source}")
        return dict(json.loads(path.read_text(encoding="utf-8")))
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as error:  # the operator's image has no hub client
        raise InputError("reading a Hugging Face model needs huggingface_hub: pip install 'kubetune[trainer]'") from error
    try:
        local = hf_hub_download(source, "config.json", revision=recipe.model.revision, token=os.environ.get("HF_TOKEN") or None)
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise InputError(
            f"spec.model.source: cannot fetch config.json of {source!r} from the Hugging Face hub ({error}); gated models need HF_TOKEN"
        ) from error
    return dict(json.loads(Path(local).read_text(encoding="utf-8")))


def _s3_config(recipe: TrainingRecipe) -> dict[str, Any]:
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as error:
        raise InputError("reading an s3:// model needs boto3: pip install 'kubetune[trainer]'") from error
    bucket, _, prefix = recipe.model.source[len("s3://") :].partition("/")
    key = "/".join(part for part in (prefix.strip("/"), "config.json") if part)
    client = boto3.client("s3", endpoint_url=recipe.output.endpoint_url, region_name=recipe.output.region)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError) as error:
        raise InputError(f"spec.model.source: cannot read s3://{bucket}/{key} ({error}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from error
    return dict(json.loads(body))


def decide(recipe: TrainingRecipe, resources: dict[str, Any], config: dict[str, Any], gpu_memory: str | None) -> FitDecision:
    """The decision the preparation step would make for this job (the GPU size as the operator would pick it)."""
    if gpu_memory:
        memory, source = parse_quantity(gpu_memory), GpuMemorySource.SPEC
    elif resources.get("gpuMemory"):
        memory, source = parse_quantity(str(resources["gpuMemory"])), GpuMemorySource.SPEC
    else:
        memory, source = parse_quantity(DEFAULT_GPU_MEMORY), GpuMemorySource.DEFAULT
    gpus = int(resources.get("gpus", 1)) * int(resources.get("nodes", 1))
    return fit(
        recipe, ModelShape.from_config(config), gpus=max(1, gpus), gpu_memory=memory, source=source, headroom=DEFAULT_HEADROOM, auto=recipe.training.auto_fit
    )


def render(recipe: TrainingRecipe, decision: FitDecision, out: TextIO) -> None:
    quant = recipe.effective_quantization()
    method = f"qlora ({quant.bits}-bit)" if quant is not None else "lora"
    out.write(f"model {recipe.model.source}: {method}, r={recipe.lora.r}, optimizer {recipe.training.optimizer.value}, ")
    out.write(f"maxSeqLength {recipe.dataset.max_seq_length}\n\n")
    width = max(len(label) for label, _ in decision.estimate.rows())
    for label, value in decision.estimate.rows():
        out.write(f"  {label:<{width}}  {format_bytes(value):>10}  {value:>15,d}\n")
    out.write(f"\nper GPU: micro-batch {decision.micro_batch}, gradient accumulation {decision.gradient_accumulation_steps}, ")
    out.write(f"gradient checkpointing {'on' if decision.gradient_checkpointing else 'off'}\n")
    auto = "autoFit" if recipe.training.auto_fit else "spec's settings (autoFit off)"
    out.write(f"{'FITS' if decision.fits else 'DOES NOT FIT'} ({auto}): {decision.message}\n")
    for suggestion in decision.suggestions:
        out.write(f"  would fit: {suggestion}\n")


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="kubetune", description="kubetune command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    estimate = commands.add_parser("estimate", help="Estimate the GPU memory of a FinetuneJob and decide the fit, as the operator would.")
    estimate.add_argument("-f", "--filename", type=Path, required=True, help="FinetuneJob YAML file.")
    estimate.add_argument("--gpu-memory", help="Memory of one GPU, for example 80Gi (default: spec.resources.gpuMemory, else 80Gi).")
    args = parser.parse_args(argv)
    try:
        recipe, resources = read_job(args.filename)
        decision = decide(recipe, resources, model_config(recipe), args.gpu_memory)
    except (InputError, ModelShapeError, ValueError) as error:
        sys.stderr.write(f"kubetune estimate: {error}\n")
        return EXIT_BAD_INPUT
    render(recipe, decision, out)
    return EXIT_FITS if decision.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
