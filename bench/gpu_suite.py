"""Every GPU figure in one run of under 8 minutes: memory, speed, overhead, peers, estimator, pod path.

On one GPU, with a random-initialised 8B-Llama-shaped model (bench/gpu_report.py's builder, no download):

1. kubetune through the trainer's own code (``gpu_report.run_case``): QLoRA (nf4, double quant, bf16
   compute, r=16 all-linear, seq 2048, micro-batch 2, checkpointing, paged 8-bit AdamW) with the defaults
   (fused kernels when Liger is installed), with ``offloadActivations``, and with fused kernels off;
   bf16 LoRA at micro-batch 4 without checkpointing;
2. overhead: the same QLoRA model in a bare torch loop and in ``training.train`` with the recipe's work
   on (metrics pushed at every log step, a local checkpoint every ``--checkpoint-every`` steps);
3. peers in processes of their own (bench/_throughput_peers.py) on the same shape, tokens and settings:
   TRL SFTTrainer with packing, the same with ``use_liger_kernel``, and Unsloth when it imports;
4. bench/estimator_gpu.py's estimate-vs-peak on the 8B QLoRA configurations;
5. bench/gpu_pod.py (the trainer pod's path on a GPU) when that script is there.

Each step runs while the time budget (``--budget``) allows; a step that fails or is skipped is a row
with ``error``. Rows keep bench/results/gpu-h200-baseline.json's fields (``case``, ``peak_vram_gib``,
``mfu``, ``tokens_per_second``) and the commit measured. The summary prints kubetune's ratios to the
best peer (tokens/s, peak memory) and the targets.

    python bench/gpu_suite.py --out bench/results/gpu-h200-suite.json
    python bench/gpu_suite.py --dry-run --out /tmp/suite.json    # tiny shapes on the CPU: the script runs
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Run as a script, only bench/ itself is on the path; its sibling modules are imported as the bench package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._gpu_overhead import overhead_rows
from bench._throughput_common import ROOT, Measurement, Settings
from bench.gpu_report import GIB, build_random_llama, peak_flops, run_case
from kubetune_api.recipe import ComputeDtype, FusedKernels, Optimizer, QuantizationSpec, QuantType

QLORA = QuantizationSpec(bits=4, type=QuantType.NF4, double_quant=True, compute_dtype=ComputeDtype.BFLOAT16)
TARGETS = {"qlora_peak_gib": 7.0, "qlora_mfu": 0.30, "lora_mfu": 0.45, "overhead": 0.03}


class Suite:
    """The rows of one run and the time left for more."""

    def __init__(self, budget: float, commit: str) -> None:
        self.deadline = time.monotonic() + budget
        self.commit = commit
        self.rows: list[dict[str, Any]] = []

    def step(self, name: str, needs: float, run: Callable[[], list[dict[str, Any]]]) -> None:
        """Run ``run`` if ``needs`` seconds are left; its rows (or one with the error) are recorded."""
        began = time.monotonic()
        if began + needs > self.deadline:
            self.add({"case": name, "error": f"skipped: needs about {needs:.0f} s, {self.deadline - began:.0f} s left"})
            return
        try:
            rows = run()
        except Exception as error:  # a failed step is a result of the run, not its end
            rows = [{"case": name, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"}]
        for row in rows:
            self.add({**row, "step_seconds": round(time.monotonic() - began, 1)})

    def add(self, row: dict[str, Any]) -> None:
        row = {"case": row["case"], "peak_vram_gib": None, "mfu": None, "tokens_per_second": None, **row, "commit": self.commit}
        print(json.dumps(row), flush=True)
        self.rows.append(row)


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=False)
    return (done.stdout.strip() or "unknown") + ("+changes" if dirty.stdout.strip() else "")


def save_tokenizer(model_dir: Path) -> None:
    """A minimal tokenizer next to the random model, for the peers that load one (the data is pre-tokenized)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    fast: Any = PreTrainedTokenizerFast
    fast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>").save_pretrained(model_dir)


def write_tokens(path: Path, rows: int, seq: int, vocab: int) -> Path:
    """``rows`` rows of ``seq`` random ids (never the pad or eos id): the same tokens for every peer."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, seq), generator=generator)
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()), encoding="utf-8")
    return path


def one_case(name: str, model_dir: Path, params: int, training: dict[str, Any], options: dict[str, Any]) -> list[dict[str, Any]]:
    return [run_case(name, model_dir, params, training=training, **options)]


def peer_row(name: str, settings: Settings, work: Path, params: int, suite: Suite) -> list[dict[str, Any]]:
    settings_path = work / f"{name}.settings.json"
    settings_path.write_text(settings.to_json(), encoding="utf-8")
    out = work / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "_throughput_peers.py"), name, str(settings_path), str(out)],
        capture_output=True,
        text=True,
        timeout=max(30.0, suite.deadline - time.monotonic()),
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        return [{"case": f"peer-{name}", "error": lines[-1][:300] if lines else f"exit {done.returncode}"}]
    measured = Measurement.load(out)
    tokens_per_second = measured.tokens_per_second
    return [
        {
            "case": f"peer-{name}",
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(tokens_per_second * 4 * params / peak_flops(), 4) if settings.cuda else None,
            "peak_vram_gib": round(measured.peak_memory_bytes / GIB, 2) if settings.cuda else None,
            "note": measured.note,
        }
    ]


def estimator_rows(work: Path, steps: int, device: str, dry_run: bool) -> list[dict[str, Any]]:
    from bench import estimator_gpu

    cases = estimator_gpu.DRY_CASES if dry_run else [c for c in estimator_gpu.GPU_CASES if c.shape == "8b" and c.method == "qlora"]
    results = estimator_gpu.run(cases, steps, work, device)
    return [
        {
            **row,
            "case": f"estimate-{row['case']}",
            "peak_vram_gib": round(row["measured_peak_bytes"] / GIB, 2) if row["measured_peak_bytes"] else None,
        }
        for row in results
    ]


def gpu_pod_rows(dry_run: bool, timeout: float) -> list[dict[str, Any]]:
    script = ROOT / "bench" / "gpu_pod.py"
    command = [sys.executable, str(script), *(["--dry-run"] if dry_run else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
    row: dict[str, Any] = {"case": "gpu-pod", "returncode": done.returncode, "output_tail": tail}
    if done.returncode != 0:
        row["error"] = f"bench/gpu_pod.py exited {done.returncode}"
    return [row]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """kubetune's QLoRA against the best peer, and every target met or not (None: not measured)."""
    by_case = {row["case"]: row for row in rows if not row.get("error")}
    ours = by_case.get("qlora-8b") or by_case.get("qlora-tiny")
    peers = [row for case, row in by_case.items() if case.startswith("peer-") and row.get("tokens_per_second")]
    result: dict[str, Any] = {"best_peer": None}
    if ours is not None and peers:
        best = max(peers, key=lambda row: row["tokens_per_second"])
        result["best_peer"] = best["case"]
        result["tokens_per_second_vs_best_peer"] = round(ours["tokens_per_second"] / best["tokens_per_second"], 3)
        if ours.get("peak_vram_gib") and best.get("peak_vram_gib"):
            result["peak_memory_vs_best_peer"] = round(ours["peak_vram_gib"] / best["peak_vram_gib"], 3)
    qlora_peaks = [row["peak_vram_gib"] for case, row in by_case.items() if case.startswith("qlora-8b") and row.get("peak_vram_gib")]
    lora = by_case.get("lora-bf16-8b")
    overhead = by_case.get("overhead-qlora-8b") or by_case.get("overhead-qlora-tiny")
    result["targets"] = {
        "qlora_peak_gib<=7.0": min(qlora_peaks) <= TARGETS["qlora_peak_gib"] if qlora_peaks else None,
        "qlora_mfu>=0.30": ours["mfu"] >= TARGETS["qlora_mfu"] if ours and ours.get("mfu") else None,
        "lora_mfu>=0.45": lora["mfu"] >= TARGETS["lora_mfu"] if lora and lora.get("mfu") else None,
        "overhead<=3%": overhead["overhead"] <= TARGETS["overhead"] if overhead and overhead.get("overhead") is not None else None,
        "tokens_per_second>=best_peer": result["tokens_per_second_vs_best_peer"] >= 1.0 if "tokens_per_second_vs_best_peer" in result else None,
        "peak_memory<=best_peer": result["peak_memory_vs_best_peer"] <= 1.0 if "peak_memory_vs_best_peer" in result else None,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="The results file to write (a new one under bench/results/ for a GPU run).")
    parser.add_argument("--dry-run", action="store_true", help="Tiny shapes on the CPU: every step runs, nothing is measured.")
    parser.add_argument("--steps", type=int, default=None, help="Steps per kubetune and peer case (default 12; dry run 4).")
    parser.add_argument("--overhead-steps", type=int, default=None, help="Steps of each overhead run (default 60; dry run 6).")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="Checkpoint interval of the overhead run (default 50; dry run 3).")
    parser.add_argument("--budget", type=float, default=450.0, help="Seconds the whole run may take; later steps are skipped past it.")
    parser.add_argument("--work", type=Path, default=None, help="Where the random model is saved (default: a temporary folder).")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        parser.error("no GPU: the figures can only be measured on one; use --dry-run to rehearse on the CPU")
    device = "cuda" if cuda else "cpu"
    shape, seq = ("tiny", 64) if args.dry_run else ("8b", 2048)
    steps = args.steps or (4 if args.dry_run else 12)
    suite = Suite(args.budget, git_commit())
    versions = {name: getattr(importlib.import_module(name), "__version__", None) for name in ("torch", "transformers", "peft", "bitsandbytes")}
    print(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else "cpu", **versions}), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:
        work = args.work or Path(scratch)
        model_dir = work / shape
        began = time.monotonic()
        params = build_random_llama(model_dir, shape, device)
        save_tokenizer(model_dir)
        print(json.dumps({"built_random_model_params": params, "seconds": round(time.monotonic() - began, 1)}), flush=True)
        vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        common: dict[str, Any] = {"seq": seq, "steps": steps, "device": device}
        qlora: dict[str, Any] = {"quant": QLORA, "batch": 2, "gc": True, "optimizer": Optimizer.PAGED_ADAMW_8BIT, **common}
        cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
            (f"qlora-{shape}", qlora, {}),
            (f"qlora-{shape}-offload", qlora, {"offload_activations": True}),
            (f"qlora-{shape}-unfused", qlora, {"fused_kernels": FusedKernels.OFF}),
            (f"lora-bf16-{shape}", {"quant": None, "batch": 4, "gc": False, "optimizer": Optimizer.ADAMW, **common}, {}),
        ]
        for name, options, training in cases:
            suite.step(name, 25, functools.partial(one_case, name, model_dir, params, training, options))
        overhead_steps = args.overhead_steps or (6 if args.dry_run else 60)
        every = args.checkpoint_every or (3 if args.dry_run else 50)
        suite.step(
            f"overhead-qlora-{shape}",
            100,
            lambda: overhead_rows(f"qlora-{shape}", model_dir, QLORA, seq=seq, steps=overhead_steps, checkpoint_every=every, device=device, work=work),
        )
        data = write_tokens(work / "tokens.jsonl", rows=max(64, 2 * steps * 2), seq=seq, vocab=vocab)
        settings = Settings(
            model_dir=str(model_dir),
            data_path=str(data),
            steps=steps,
            seq_len=seq,
            batch_size=2,
            grad_accum=1,
            log_every=2,
            checkpoint_every=10**6,
            seed=0,
            learning_rate=2e-4,
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            cuda=cuda,
            quantized=True,
            gradient_checkpointing=True,
            optimizer="paged_adamw_8bit" if cuda else None,
        )
        peers = ["trl-packed"]
        peers += ["trl-packed-liger"] if cuda and importlib.util.find_spec("liger_kernel") else []
        peers += ["unsloth"] if cuda and importlib.util.find_spec("unsloth") else []
        for peer in peers:
            suite.step(f"peer-{peer}", 45, functools.partial(peer_row, peer, settings, work, params, suite))
        for peer in {"trl-packed-liger", "unsloth"} - set(peers):
            suite.add({"case": f"peer-{peer}", "error": "skipped: needs a GPU and the package installed"})
        suite.step("estimator", 40, lambda: estimator_rows(work, 3 if cuda else 1, device, args.dry_run))
    if (ROOT / "bench" / "gpu_pod.py").is_file():
        suite.step("gpu-pod", 60, lambda: gpu_pod_rows(args.dry_run, timeout=max(60.0, suite.deadline - time.monotonic())))
    else:
        suite.add({"case": "gpu-pod", "error": "skipped: bench/gpu_pod.py is not in this tree"})
    result = summary(suite.rows)
    print(json.dumps(result), flush=True)
    document = {"device": device, "commit": suite.commit, **versions, "rows": suite.rows, "summary": result}
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
