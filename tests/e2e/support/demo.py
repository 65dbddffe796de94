"""``make demo``: the tiny CPU FinetuneJob end to end on the local cluster.

Starts the control plane, the node agent, S3 and Prometheus, installs kubetune with helm, applies
``examples/tiny-cpu-lora.yaml`` with kubectl, shows live progress from the FinetuneJob's status,
then prints where the adapter is and one generation with and without it. Interactive runs wait for
Enter before stopping everything; ``--non-interactive`` (or no terminal) stops at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

from localcluster.process import interrupt
from tests.e2e.support.local_stack import KubetuneStack
from tests.e2e.support.stack import DEMO_BUCKET, REPO, StackSettings

EXAMPLE = "tiny-cpu-lora.yaml"
PROMPT = "The lighthouse keeper counts"
"""The start of the first line of examples/data/memorise.jsonl, which the demo job learns by heart."""
BAR_WIDTH = 30


def say(message: str) -> None:
    print(message, flush=True)


def bar(status: dict[str, Any]) -> str:
    progress = status.get("progress") or {}
    percent = int(progress.get("percent", 0))
    filled = BAR_WIDTH * percent // 100
    loss = progress.get("loss")
    loss_text = f"loss {loss:.3f}" if isinstance(loss, int | float) else "loss -"
    step = f"step {progress.get('step', 0)}/{progress.get('totalSteps') or '?'}"
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:3d}%  {step}  {loss_text}  {status.get('phase', 'Pending')}"


def quiet_model_loading() -> None:
    """No progress bars or library deprecation notes in the demo's output: it shows only what it claims."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # peft calls a transformers name deprecated in v5 when it wraps a model; nothing the demo can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def generations(stack: KubetuneStack, adapter_uri: str) -> tuple[str, str]:
    """Greedy completions of PROMPT by the base model and by the base model with the adapter."""
    quiet_model_loading()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert stack.s3 is not None
    base_dir = stack.workdir / "tiny-llama"
    bucket, _, prefix = adapter_uri.removeprefix("s3://").partition("/")
    adapter_dir = Path(tempfile.mkdtemp(prefix="kubetune-adapter-", dir=stack.workdir))
    s3 = stack.s3.client()
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        target = adapter_dir / item["Key"][len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, item["Key"], str(target))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    inputs = tokenizer(PROMPT, return_tensors="pt")

    def complete(model: Any) -> str:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return str(tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    without = complete(base)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    return without, complete(tuned)


def hand_off(status: dict[str, Any]) -> list[str]:
    """The evaluation gate's verdict and how to serve the adapter, from the FinetuneJob status."""
    lines: list[str] = []
    report = status.get("evaluation")
    if report:
        lines.append(
            f"evaluation: base eval loss {report.get('baseEvalLoss', float('nan')):.4f} (perplexity {report.get('basePerplexity', float('nan')):.1f}), "
            f"adapter {report.get('finalEvalLoss', float('nan')):.4f} (perplexity {report.get('finalPerplexity', float('nan')):.1f}); "
            f"gate {report.get('gate')}"
        )
    lines.extend(usage_lines(status))
    serving = (status.get("result") or {}).get("serving")
    if serving and serving.get("compatible"):
        lines.append("serve it with vLLM:  vllm serve " + " ".join(serving["vllmArgs"]))
        lines.append("or with KServe (kubectl apply -f -):")
        lines.extend("    " + line for line in str(serving.get("kserveInferenceService") or "").splitlines())
    elif serving:
        lines.append("vLLM cannot serve this adapter as it is: " + "; ".join(serving.get("reasons") or []))
    return lines


def usage_lines(status: dict[str, Any]) -> list[str]:
    """GPU time, the work restarts cost, and the estimated cost, from status.usage."""
    usage = status.get("usage")
    if not usage:
        return []
    attempts = usage.get("attempts") or []
    seconds = sum(float(a.get("seconds") or 0) for a in attempts)
    line = (
        f"usage: {float(usage.get('gpuSeconds') or 0) / 3600:.3f} GPU hours over {len(attempts)} attempt(s) ({seconds:.0f} s of trainer time); "
        f"{usage.get('redoneSteps', 0)} steps redone after restarts ({float(usage.get('lostSeconds') or 0):.0f} s)"
    )
    if usage.get("estimatedCost") is not None:
        line += f"; estimated cost {float(usage['estimatedCost']):.2f} {usage.get('currency') or ''}".rstrip()
    return [line]


def as_typed(path: Path) -> str:
    """A path as the user would type it from the repository root."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def manifest_to_apply(stack: KubetuneStack, body: dict[str, Any]) -> tuple[Path, str]:
    """The file the demo applies, and what was changed from the example to get it ("" when nothing was).

    The example points at the S3 endpoint on port 9000; with another port (--s3-port) the body points at the
    stack's endpoint instead, and is written next to the demo's files so the command shown is the one that runs.
    """
    example = REPO / "examples" / EXAMPLE
    original = yaml.safe_load(example.read_text())
    endpoint = body["spec"]["output"]["endpointUrl"]
    if endpoint == original["spec"]["output"].get("endpointUrl"):
        return example, ""
    rewritten = stack.workdir / EXAMPLE
    rewritten.write_text(yaml.safe_dump(body, sort_keys=False))
    return rewritten, f"spec.output.endpointUrl={endpoint}"


def run(args: argparse.Namespace) -> int:
    stack = KubetuneStack(StackSettings(workdir=args.workdir, s3_port=args.s3_port))
    # A terminal closing or a supervisor's SIGTERM stops the demo like Ctrl-C: everything it started is stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        stack.start(progress=lambda step: say(f"==> {step}"))
        namespace = stack.settings.jobs_namespace
        body = stack.example(EXAMPLE)
        manifest, rewritten = manifest_to_apply(stack, body)
        note = f"   # examples/{EXAMPLE} with {rewritten}" if rewritten else ""
        say(f"==> KUBECONFIG={as_typed(stack.kubeconfig)} kubectl apply -f {as_typed(manifest)} -n {namespace}{note}")
        stack.kubectl("apply", "-f", str(manifest), "-n", namespace)
        name = body["metadata"]["name"]
        final: dict[str, Any] = {}
        shown = ""
        for status in stack.watch_progress(name, timeout=args.timeout):
            final = status
            if bar(status) != shown:
                shown = bar(status)
                print(shown, end="\r" if sys.stdout.isatty() else "\n", flush=True)
        print()
        say(stack.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout)
        if final.get("phase") != "Succeeded":
            say(f"the FinetuneJob ended {final.get('phase')}: {final.get('message')}")
            return 1
        result = final["result"]
        say(f"adapter: {result['adapterUri']} (manifest sha256 {result.get('manifestSha256')}, {result.get('sizeBytes')} bytes)")
        for line in hand_off(final):
            say(line)
        say(f"S3 endpoint: {stack.s3.endpoint_url if stack.s3 else '?'}  bucket: {DEMO_BUCKET}")
        without, with_adapter = generations(stack, result["adapterUri"])
        say(f"prompt:            {PROMPT!r}")
        say(f"base model:        {without!r}")
        say(f"with the adapter:  {with_adapter!r}")
        if stack.prometheus is not None:
            say(f"Prometheus: {stack.prometheus.url}  kubeconfig: {stack.kubeconfig}")
        if not args.non_interactive and sys.stdin.isatty():
            input("Press Enter to stop the local cluster, S3 and Prometheus (Ctrl-C works too). ")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # stopping must not be cut short
        say("==> stopping everything the demo started")
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.support.demo", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "demo", help="Where the demo keeps its files.")
    parser.add_argument("--non-interactive", action="store_true", help="Stop as soon as the job has finished.")
    parser.add_argument("--s3-port", type=int, default=9000, help="Port of the local S3 endpoint (the example points at 9000).")
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds to wait for the FinetuneJob.")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
