"""The evaluation gate: the base model's eval loss before the first step, the adapter's at the end, the verdict.

The base figure is measured with the adapter switched off (peft's ``disable_adapter``), so a resumed attempt
measures the same base model a fresh one does. Every rank takes part in both evaluations and reaches the same
verdict (the losses are all-reduced), so every rank raises ``EvaluationGateError`` together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubetune_api import layout
from kubetune_api.quality import EvaluationReport, EvaluationSpec, GateResult, evaluation_report
from kubetune_api.recipe import Precision
from kubetune_trainer import export, logs, training
from kubetune_trainer.distributed import Context
from kubetune_trainer.errors import EvaluationGateError
from kubetune_trainer.storage.run import RunFiles


def base_eval_loss(
    peft_model: Any, model: Any, eval_batches: Callable[[], Iterator[training.BatchLike]] | None, *, ctx: Context, precision: Precision
) -> float | None:
    """Eval loss of the base model (adapter disabled) on the eval split; None without one."""
    if eval_batches is None:
        return None
    with peft_model.disable_adapter():
        return training.evaluate(model, eval_batches(), ctx=ctx, precision=precision)


def judge(spec: EvaluationSpec | None, base: float | None, final: float | None) -> EvaluationReport | None:
    """The report of a run with an eval split (None without one: nothing was measured)."""
    if base is None and final is None:
        return None
    return evaluation_report(spec, base, final)


def rejected(report: EvaluationReport, uri: str | None) -> EvaluationGateError:
    """The error ending a run whose adapter failed the gate; it carries the report with where the candidate was kept."""
    kept = report.model_copy(update={"rejected_uri": uri})
    where = f" The adapter was kept as a rejected candidate at {uri} and not published." if uri else " The adapter was not published."
    error = EvaluationGateError(
        "The adapter failed spec.evaluation: " + "; ".join(kept.reasons) + "." + where + " Train longer, adjust the recipe, or relax the gate."
    )
    error.report = kept
    return error


def keep_rejected(
    run_files: RunFiles, peft_model: Any, tokenizer: Any, output_dir: Path, manifest: dict[str, Any], weights: dict[str, Any] | None = None
) -> str:
    """Save the adapter (``weights``: gathered from a sharded model) and keep it under the run's rejected folder, with its
    manifest; returns its URI."""
    adapter_dir = output_dir / layout.REJECTED_FOLDER
    export.save_adapter(peft_model, tokenizer, adapter_dir, weights)
    kept = run_files.keep_rejected(adapter_dir, manifest)
    logs.event("adapter rejected by the evaluation gate", level=30, uri=kept.uri, reasons=(manifest.get("evaluation") or {}).get("reasons"))
    return kept.uri


def failed(report: EvaluationReport | None) -> bool:
    return report is not None and report.gate is GateResult.FAILED
