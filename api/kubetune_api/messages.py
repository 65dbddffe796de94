"""Every validation message a user can see, once: CEL rules in the CRD and their Python twins both use these.

A message names the field and what to do. Keys are stable identifiers; the operator, the trainer and the tests
refer to messages by key, never by copying the text.
"""

from __future__ import annotations

MESSAGES: dict[str, str] = {
    "source.s3": "{field}: an s3:// source must look like s3://bucket/key-or-prefix, with no '.' or '..' segments in the key",
    "source.scheme": (
        "{field}: not a form kubetune reads (a typo such as s3:/ for s3://, or an unsupported scheme); use s3://bucket/prefix, "
        "a Hugging Face id such as org/name, or a local path such as /models/name or file:///models/name"
    ),
    "output.prefix": "spec.output.prefix: use key segments separated by single slashes, with no '.' or '..' segments and no leading slash",
    "dataset.eval.one_of": "spec.dataset.eval: set exactly one of ratio (a share of the training data) or source (a separate dataset)",
    "training.one_of": "spec.training: set exactly one of epochs or maxSteps",
    "training.warmup": "spec.training.warmupSteps must be smaller than spec.training.maxSteps",
    "training.eval_every": "spec.training.evalEvery needs spec.dataset.eval (a ratio or a source)",
    "evaluation.eval": "spec.evaluation needs spec.dataset.eval (a ratio or a source): the gate compares eval losses",
    "quantization.method": "spec.quantization is only valid with method: qlora; remove it or set spec.method to qlora",
    "resources.multinode": (
        "spec.resources.nodeSelector: a job with spec.resources.nodes > 1 runs one pod per node (GPU nodes, or CPU nodes with gloo "
        "when gpus is 0), so it must not pin kubernetes.io/hostname; remove that key or set nodes to 1"
    ),
    "training.fp16_cpu": "spec.training.precision fp16 needs GPUs: use auto or fp32 when spec.resources.gpus is 0",
    "training.paged_cpu": "spec.training.optimizer: paged optimizers need GPUs; use adamw when spec.resources.gpus is 0",
    "spec.immutable": ("spec is immutable except {mutable}: delete and recreate the FinetuneJob to change what it trains"),
}


def message(key: str, **values: str) -> str:
    """The message for ``key``, with its placeholders filled in."""
    return MESSAGES[key].format(**values) if values else MESSAGES[key]
