"""GPU figures only a real accelerator can give: throughput, MFU and peak VRAM on an 8B-shaped model.

Builds a random-initialised Llama-3-8B-shaped model (no download), saves it, then loads it through
the trainer's own code (``load_base_model``, ``apply_lora``, ``LossModel``, ``build_optimizer``, ``train``) for

- bf16 LoRA (r=16, all linear layers, seq 2048), and
- QLoRA (4-bit nf4, double quantization, bf16 compute, r=16, all linear, seq 2048, micro-batch 2,
  gradient checkpointing, paged 8-bit AdamW): the configuration whose peak VRAM target is 12 GiB,

on synthetic token batches (the data pipeline is measured on CPU by bench/trainer_throughput.py).
MFU counts 4*N FLOPs per token for LoRA (forward 2N + input-gradient backward 2N; frozen weights
need no weight gradients), N = base-model parameters, against the GPU's dense bf16 peak. It also checks
that the trainer's VRAM metric (kubetune_trainer_gpu_memory_peak_bytes) equals torch's own peak.

    python bench/gpu_report.py [--steps 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune_api.recipe import ComputeDtype, LoraSpec, Optimizer, Precision, QuantizationSpec, QuantType, TrainingSpec
from kubetune_trainer.distributed import Context
from kubetune_trainer.local_checkpoints import TrainingState
from kubetune_trainer.loss import build_loss_model
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.model import ModelFiles, apply_lora, load_base_model
from kubetune_trainer.training import Hooks, Progress, build_optimizer, build_scheduler, train

GIB = 1024**3
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    num_tokens: int
    num_target_tokens: int


class SyntheticStream:
    """Endless random-token batches of a fixed shape, pinned for fast host-to-device copies."""

    def __init__(self, batch_size: int, seq_len: int, vocab: int) -> None:
        self.seq_len, self.vocab = seq_len, vocab
        self.count = 0
        self._build(batch_size)

    def _build(self, batch_size: int) -> None:
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab, (batch_size, self.seq_len), generator=generator)
        ids = ids.pin_memory() if torch.cuda.is_available() else ids
        self.batch = Batch({"input_ids": ids, "labels": ids}, batch_size * self.seq_len, batch_size * (self.seq_len - 1))

    def rebatch(self, state: dict[str, Any], batch_size: int) -> None:
        """After an out-of-memory halving: the same random rows, fewer per batch."""
        self._build(batch_size)

    def __next__(self) -> Batch:
        self.count += 1
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.count}

    @property
    def epoch_progress(self) -> float:
        return 0.0


SHAPES: dict[str, dict[str, Any]] = {
    "8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    # Llama-3.2-1B's dimensions (untied head here).
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8},
    # A quick rehearsal of the whole script on a CPU.
    "tiny": {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
}


def peak_flops() -> float:
    """Dense bf16 FLOP/s of this machine's GPU (an H100's when unknown or on a CPU)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in gpu), 989e12)


def build_random_llama(out: Path, shape: str, device: str) -> int:
    """Save a random Llama-3-shaped model to ``out``; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_parameters=rope, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="4GB")
    del model
    return params


def train_one_process(model: Any, optimizer: Any, scheduler: Any, stream: Any, spec: TrainingSpec, hooks: Hooks) -> None:
    """``training.train`` for ``spec.max_steps`` steps from scratch in a single process, bf16 on a GPU, fp32 on a CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() and next(model.parameters()).is_cuda else "cpu")
    ctx = Context(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, device=device)
    precision = Precision.BF16 if device.type == "cuda" else Precision.FP32
    steps = spec.max_steps or 1
    train(model, optimizer, scheduler, stream, spec=spec, steps=steps, state=TrainingState(), ctx=ctx, precision=precision, hooks=hooks, eval_batches=None)


def run_case(
    name: str,
    path: Path,
    params: int,
    *,
    quant: QuantizationSpec | None,
    batch: int,
    seq: int,
    gc: bool,
    optimizer: Optimizer,
    steps: int,
    device: str,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``steps`` steps of one configuration through the trainer's code; ``training`` adds TrainingSpec fields
    (offload_activations, fused_kernels)."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    started = time.monotonic()
    files = ModelFiles(path=str(path), revision=None, token=None, cache_dir=None)
    model = load_base_model(files, dtype_name="bfloat16", quantization=quant, device=device, trust_remote_code=False)
    model = apply_lora(model, LoraSpec(r=16, alpha=32, dropout=0.0), gradient_checkpointing=gc)
    load_seconds = time.monotonic() - started
    extra = training or {}
    spec = TrainingSpec(max_steps=steps, log_every=2, checkpoint_every=10**6, optimizer=optimizer, gradient_checkpointing=gc, precision=Precision.BF16, **extra)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(spec, trainable, cuda=cuda)
    sched = build_scheduler(spec, opt, steps)
    logs: list[Progress] = []
    hooks = Hooks(on_log=logs.append, on_eval=lambda *_: None, on_checkpoint=lambda _: None, stop_requested=lambda: False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_one_process(build_loss_model(model, spec, torch.device(device)), opt, sched, SyntheticStream(batch, seq, model.config.vocab_size), spec, hooks)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    metrics = TrainerMetrics("bench", name, 0, {"method": name})
    from prometheus_client import generate_latest

    exposition = generate_latest(metrics.registry).decode()
    metric_peaks = [float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines() if line.startswith("kubetune_trainer_gpu_memory_peak_bytes")]
    steady = logs[1:] or logs  # the first interval includes warm-up (allocator, kernels)
    tokens_per_second = sum(p.interval_tokens for p in steady) / sum(p.interval_tokens / p.tokens_per_second for p in steady)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    result = {
        "case": name,
        "gpu": gpu,
        "params": params,
        "trainable_params": sum(p.numel() for p in trainable),
        "micro_batch": batch,
        "seq_len": seq,
        "gradient_checkpointing": gc,
        "optimizer": optimizer.value,
        **{key: value.value if hasattr(value, "value") else value for key, value in extra.items()},
        "load_seconds": round(load_seconds, 1),
        "tokens_per_second": round(tokens_per_second, 1),
        "mfu": round(tokens_per_second * 4 * params / peak_flops(), 4),
        "peak_vram_gib": round(peak / GIB, 2),
        "reserved_vram_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else 0,
        "metric_peak_bytes": metric_peaks,
        "metric_peak_matches_torch": metric_peaks == [float(peak)] if cuda else metric_peaks == [],
        "loss_first_last": [round(logs[0].loss, 4), round(logs[-1].loss, 4)],
    }
    print(json.dumps(result), flush=True)
    del model, opt, sched
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama-8b-random"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    import bitsandbytes
    import peft
    import transformers

    print(
        json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__})
    )
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = build_random_llama(args.model_dir, args.shape, device)
    print(json.dumps({"built_random_model_params": params, "seconds": round(time.monotonic() - started, 1)}), flush=True)
    qlora = QuantizationSpec(bits=4, type=QuantType.NF4, double_quant=True, compute_dtype=ComputeDtype.BFLOAT16)
    common: dict[str, Any] = {"seq": args.seq, "steps": args.steps, "device": device}
    results = [
        run_case("qlora-8b", args.model_dir, params, quant=qlora, batch=2, gc=True, optimizer=Optimizer.PAGED_ADAMW_8BIT, **common),
        run_case("lora-bf16-8b", args.model_dir, params, quant=None, batch=4, gc=False, optimizer=Optimizer.ADAMW, **common),
    ]
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
