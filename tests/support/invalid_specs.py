"""Invalid FinetuneJob specs and the field each rejection must name.

Shared by the unit tests (schema + model rules) and the end-to-end suite (a real apiserver).
Each case changes the tiny CPU example at dotted paths.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class InvalidSpec:
    name: str
    changes: dict[str, Any]
    field: str
    """A field path fragment the error message must contain."""
    DELETE: ClassVar[object] = object()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


INVALID_SPECS: list[InvalidSpec] = [
    InvalidSpec("both-epochs-and-max-steps", {"spec.training.epochs": 1}, "spec.training"),
    InvalidSpec("neither-epochs-nor-max-steps", {"spec.training.maxSteps": InvalidSpec.DELETE}, "spec.training"),
    InvalidSpec("quantization-with-lora", {"spec.quantization": {"bits": 4}}, "spec.quantization"),
    InvalidSpec(
        "multi-node-on-one-host", {"spec.resources.nodes": 2, "spec.resources.nodeSelector": {"kubernetes.io/hostname": "a"}}, "spec.resources.nodeSelector"
    ),
    InvalidSpec("fp16-on-cpu", {"spec.training.precision": "fp16"}, "spec.training.precision"),
    InvalidSpec("unknown-method", {"spec.method": "full"}, "spec.method"),
    InvalidSpec("negative-learning-rate", {"spec.training.learningRate": -0.1}, "spec.training.learningRate"),
    InvalidSpec("zero-rank", {"spec.lora.r": 0}, "spec.lora.r"),
    InvalidSpec("three-bit-quantization", {"spec.method": "qlora", "spec.quantization": {"bits": 3}}, "spec.quantization.bits"),
    InvalidSpec("unknown-dataset-format", {"spec.dataset.format": "xml"}, "spec.dataset.format"),
    InvalidSpec("bad-bucket-name", {"spec.output.bucket": "Bad_Bucket"}, "spec.output.bucket"),
    InvalidSpec("missing-output", {"spec.output": InvalidSpec.DELETE}, "spec.output"),
    InvalidSpec("eval-ratio-of-one", {"spec.dataset.eval": {"ratio": 1.0}}, "spec.dataset.eval.ratio"),
    InvalidSpec(
        "eval-every-without-eval-set",
        {"spec.dataset.eval": InvalidSpec.DELETE, "spec.evaluation": InvalidSpec.DELETE, "spec.training.evalEvery": 10},
        "spec.training.evalEvery",
    ),
    InvalidSpec("gate-without-eval-set", {"spec.dataset.eval": InvalidSpec.DELETE}, "spec.evaluation needs spec.dataset.eval"),
    InvalidSpec("divergence-factor-of-one", {"spec.training.divergence": {"factor": 1.0}}, "spec.training.divergence.factor"),
    InvalidSpec("malformed-s3-model", {"spec.model.source": "s3://"}, "spec.model.source"),
    InvalidSpec("tiny-max-seq-length", {"spec.dataset.maxSeqLength": 4}, "spec.dataset.maxSeqLength"),
    InvalidSpec("paged-optimizer-on-cpu", {"spec.training.optimizer": "paged_adamw_8bit"}, "spec.training.optimizer"),
    InvalidSpec("unknown-field", {"spec.training.lerningRate": 0.1}, "lerningRate"),
    InvalidSpec("bad-cpu-quantity", {"spec.resources.cpu": "lots"}, "spec.resources.cpu"),
    # Paths built from user input: none may climb out of the folder meant, or pass a typo off as a local path.
    InvalidSpec("output-prefix-climbs-out", {"spec.output.prefix": "../../other-team"}, "spec.output.prefix"),
    InvalidSpec("output-prefix-dot-segment-inside", {"spec.output.prefix": "runs/../other-team"}, "spec.output.prefix"),
    InvalidSpec("output-prefix-absolute", {"spec.output.prefix": "/runs"}, "spec.output.prefix"),
    InvalidSpec("output-prefix-empty-segment", {"spec.output.prefix": "runs//team"}, "spec.output.prefix"),
    InvalidSpec("model-source-climbs-out", {"spec.model.source": "s3://bucket/../../../../tmp/x/"}, "spec.model.source"),
    InvalidSpec("model-source-one-slash", {"spec.model.source": "s3:/bad"}, "spec.model.source"),
    InvalidSpec("model-source-unknown-scheme", {"spec.model.source": "gs://bucket/model"}, "spec.model.source"),
    InvalidSpec("dataset-source-climbs-out", {"spec.dataset.source": "s3://bucket/data/../../x.jsonl"}, "spec.dataset.source"),
    InvalidSpec("dataset-source-one-slash", {"spec.dataset.source": "s3:/bucket/data.jsonl"}, "spec.dataset.source"),
    InvalidSpec("eval-source-climbs-out", {"spec.dataset.eval": {"source": "s3://bucket/./.."}}, "spec.dataset.eval.source"),
    InvalidSpec("zero-checkpoints-kept", {"spec.output.keepCheckpoints": 0}, "spec.output.keepCheckpoints"),
]


def apply_change(body: dict[str, Any], case: InvalidSpec) -> dict[str, Any]:
    body = copy.deepcopy(body)
    for path, value in case.changes.items():
        node = body
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is InvalidSpec.DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return body
