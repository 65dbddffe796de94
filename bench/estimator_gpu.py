"""The memory estimator against measured peaks: LoRA / QLoRA x micro-batch x sequence length x checkpointing.

On a GPU it builds random-initialised 8B- and 1B-shaped Llama models (no download, bench/gpu_report.py's
builder), trains each configuration a few steps through the trainer's own code (load_base_model, apply_lora,
LossModel, build_optimizer, train) and records, per configuration, the estimate
(``kubetune_api.estimate``: ``allocatedPeak``, what torch.cuda.max_memory_allocated counts) next to the
measured peak, with the error. Target: every estimate within 10% of the peak and never more than 5% below it.

    python bench/estimator_gpu.py [--out bench/results/estimator-h200.json] [--steps 3]
    python bench/estimator_gpu.py --dry-run        # tiny shapes on the CPU: the script runs, nothing is measured

The printed table ends with the ratio estimate / measured of each configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune_api.estimate import EstimateInput, ModelShape, estimate
from kubetune_api.recipe import ComputeDtype, LoraSpec, Optimizer, Precision, QuantizationSpec, QuantType, TrainingSpec
from kubetune_trainer.loss import LossModel
from kubetune_trainer.model import ModelFiles, apply_lora, load_base_model
from kubetune_trainer.training import Hooks, build_optimizer, build_scheduler

# Run as a script, only bench/ itself is on the path; its sibling modules are imported as the bench package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_report import SyntheticStream, build_random_llama, train_one_process

GIB = 1024**3
R = 16


@dataclass(frozen=True)
class Case:
    shape: str
    method: str
    micro_batch: int
    seq_len: int
    checkpointing: bool

    @property
    def name(self) -> str:
        return f"{self.method}-{self.shape}-mb{self.micro_batch}-s{self.seq_len}-{'gc' if self.checkpointing else 'nogc'}"

    @property
    def optimizer(self) -> Optimizer:
        return Optimizer.PAGED_ADAMW_8BIT if self.method == "qlora" else Optimizer.ADAMW


GPU_CASES = [
    Case("8b", "qlora", 1, 2048, True),
    Case("8b", "qlora", 2, 2048, True),
    Case("8b", "qlora", 2, 1024, False),
    Case("8b", "lora", 1, 2048, True),
    Case("8b", "lora", 4, 2048, False),
    Case("8b", "lora", 2, 1024, False),
    Case("1b", "lora", 8, 2048, True),
    Case("1b", "lora", 4, 1024, False),
    Case("1b", "qlora", 8, 2048, True),
    Case("1b", "qlora", 4, 4096, False),
]
DRY_CASES = [Case("tiny", "lora", 2, 64, False), Case("tiny", "qlora", 2, 64, True)]


def estimated(case: Case, shape: ModelShape) -> tuple[int, int]:
    """(allocated peak, total) the estimator gives for ``case``."""
    breakdown = estimate(
        EstimateInput(
            shape,
            case.micro_batch,
            case.seq_len,
            case.checkpointing,
            compute_bytes=2,
            quant_bits=4 if case.method == "qlora" else None,
            lora_r=R,
            lora_dropout=False,
            optimizer=case.optimizer,
        )
    )
    return breakdown.allocated_peak, breakdown.total


def measure(case: Case, model_dir: Path, steps: int, device: str) -> int | None:
    """Peak allocated bytes of ``steps`` training steps of ``case`` (None on a CPU)."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quant = QuantizationSpec(bits=4, type=QuantType.NF4, double_quant=True, compute_dtype=ComputeDtype.BFLOAT16) if case.method == "qlora" else None
    files = ModelFiles(path=str(model_dir), revision=None, token=None, cache_dir=None)
    model = load_base_model(files, dtype_name="bfloat16", quantization=quant, device=device, trust_remote_code=False)
    model = apply_lora(model, LoraSpec(r=R, alpha=32, dropout=0.0), gradient_checkpointing=case.checkpointing)
    spec = TrainingSpec(
        max_steps=steps,
        log_every=steps,
        checkpoint_every=10**6,
        optimizer=case.optimizer,
        gradient_checkpointing=case.checkpointing,
        precision=Precision.BF16,
        per_device_batch_size=case.micro_batch,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(spec, trainable, cuda=cuda)
    hooks = Hooks(on_log=lambda _: None, on_eval=lambda *_: None, on_checkpoint=lambda _: None, stop_requested=lambda: False)
    stream = SyntheticStream(case.micro_batch, case.seq_len, model.config.vocab_size)
    train_one_process(LossModel(model), optimizer, build_scheduler(spec, optimizer, steps), stream, spec, hooks)
    peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    del model, optimizer
    return peak


def run(cases: list[Case], steps: int, work: Path, device: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    built: dict[str, Path] = {}
    for case in cases:
        if case.shape not in built:
            built[case.shape] = work / case.shape
            # A model an earlier step of the same run built (bench/gpu_suite.py) is reused.
            if not (built[case.shape] / "config.json").is_file():
                build_random_llama(built[case.shape], case.shape, device)
        shape = ModelShape.from_config(json.loads((built[case.shape] / "config.json").read_text()))
        allocated, total = estimated(case, shape)
        began = time.monotonic()
        try:
            peak = measure(case, built[case.shape], steps, device)
            error = None
        except torch.OutOfMemoryError as oom:
            peak, error = None, str(oom).splitlines()[0]
        row: dict[str, Any] = {
            "case": case.name,
            "estimate_allocated_bytes": allocated,
            "estimate_total_bytes": total,
            "measured_peak_bytes": peak,
            "ratio": round(allocated / peak, 4) if peak else None,
            "seconds": round(time.monotonic() - began, 1),
        }
        if error:
            row["error"] = error
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def report(results: list[dict[str, Any]]) -> None:
    print(f"{'case':<32} {'estimate GiB':>12} {'measured GiB':>12} {'estimate/measured':>18}")
    for row in results:
        measured = row["measured_peak_bytes"]
        shown = f"{measured / GIB:12.2f}" if measured else f"{'-':>12}"
        ratio = f"{row['ratio']:18.3f}" if row["ratio"] else f"{'-':>18}"
        print(f"{row['case']:<32} {row['estimate_allocated_bytes'] / GIB:12.2f} {shown} {ratio}")
    ratios = [row["ratio"] for row in results if row["ratio"]]
    if ratios:
        within = all(0.95 <= r <= 1.10 for r in ratios)
        print(f"worst ratios: {min(ratios):.3f} .. {max(ratios):.3f}; target 0.95 .. 1.10: {'met' if within else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="Tiny shapes on the CPU: checks that the script runs; nothing is measured.")
    parser.add_argument("--work", type=Path, default=None, help="Where the random models are saved (default: a temporary folder).")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        parser.error("no GPU: the peaks can only be measured on one; use --dry-run to rehearse on the CPU")
    device = "cuda" if cuda and not args.dry_run else "cpu"
    with tempfile.TemporaryDirectory(prefix="estimator-") as scratch:
        work = args.work or Path(scratch)
        results = run(DRY_CASES if args.dry_run else GPU_CASES, args.steps, work, device)
    report(results)
    if args.out is not None:
        document = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__, "results": results}
        args.out.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
