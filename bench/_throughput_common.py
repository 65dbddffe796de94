"""Settings and measurement shared by the trainer throughput benchmark and its peer contenders.

Every contender runs in its own process with the same ``Settings`` (passed as JSON) and reports
a ``Measurement``: real (non-padding) tokens and seconds of the optimizer steps after the first
``warmup_steps``, so model and data loading, compilation and allocator warm-up are excluded from
all of them in the same way.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
"""What kubetune's 'all-linear' resolves to on a Llama model; peers pass peft's 'all-linear', the same set."""


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration; identical for every contender."""

    model_dir: str
    data_path: str
    steps: int
    seq_len: int
    batch_size: int
    grad_accum: int
    log_every: int
    checkpoint_every: int
    seed: int
    learning_rate: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    cuda: bool
    quantized: bool = False
    """QLoRA: the base in 4-bit nf4 with double quantization and bf16 compute (bench/gpu_suite.py)."""
    gradient_checkpointing: bool = False
    optimizer: str | None = None
    """A transformers ``optim`` name; None is fused AdamW on a GPU and AdamW on a CPU."""

    @property
    def warmup_steps(self) -> int:
        """Steps left out of the measurement: the first log interval, as kubetune's logs give it."""
        return self.log_every

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Measurement:
    """Tokens and seconds of the measured optimizer steps of one contender run."""

    contender: str
    tokens: int
    seconds: float
    steps: int
    note: str = ""
    peak_memory_bytes: int = 0
    """torch.cuda.max_memory_allocated over the whole run (0 on a CPU)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Measurement:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return cls(**data)


def write_dataset(path: Path, records: int, seed: int) -> Path:
    """``records`` text records of very different lengths, made of corpus sentences, the same for a seed.

    The sentence count per record is geometric-like (mean about 7, tail past the sequence length),
    as real instruction and document datasets are: padding wastes much and packing helps.
    """
    from tinymodel import corpus_lines

    lines = corpus_lines()
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(records):
            count = min(48, 1 + int(rng.expovariate(1 / 6)))
            start = rng.randrange(len(lines))
            text = " ".join(lines[(start + i) % len(lines)] for i in range(count))
            out.write(json.dumps({"text": text}) + "\n")
    return path


class StepClock:
    """Marks the end of the warm-up and the end of the run; the caller syncs the device first."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None

    def wants(self, step: int) -> bool:
        return step in (self.warmup_steps, self.total_steps)

    def mark(self, step: int, now: float, tokens: int) -> None:
        if step == self.warmup_steps:
            self.start = (now, tokens)
        if step == self.total_steps:
            self.end = (now, tokens)

    def measurement(self, contender: str, note: str = "") -> Measurement:
        if self.start is None or self.end is None:
            raise RuntimeError(f"{contender}: the run ended before step {self.total_steps}")
        return Measurement(contender, self.end[1] - self.start[1], self.end[0] - self.start[0], self.total_steps - self.warmup_steps, note)
