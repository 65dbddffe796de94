"""kubetune's contract: everything the operator and the trainer exchange, declared once.

- ``recipe``: the spec parts shared by the FinetuneJob CRD and the trainer (model, dataset, method,
  LoRA, quantization, training, output), with their CEL rules;
- ``runtime``: the trainer's input (``TrainerConfig`` = recipe + ``RuntimeConfig``), the paths and ports
  both sides agree on, and ``TrainerEnvironment``, the variables the operator sets on the trainer pod;
- ``result``: what the trainer reports back (termination message, result, checkpoint references);
- ``layout``: where a run's checkpoints and adapter live in S3;
- ``metrics``: the trainer's metric names; ``exitcodes``: its exit codes and reasons;
- ``messages``: the validation messages that the apiserver (CEL) and the Python twins both use.

It imports neither torch nor kopf (a test enforces that): both images install it.
"""

__version__ = "0.1.0"
