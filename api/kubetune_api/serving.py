"""Serving hand-off: whether vLLM can serve a published adapter, and the flags and KServe manifest that do (pure).

vLLM's LoRA support (docs "LoRA Adapters"; vllm-project/vllm #9280, #4186) loads an adapter only when its rank
is at most ``--max-lora-rank`` (one of ``SUPPORTED_RANKS``), its target modules are linear layers vLLM can patch
for the architecture, it has no ``modules_to_save`` (full copies of embeddings or lm_head), and the tokenizer is
the base model's. The trainer reports the adapter's facts (``AdapterFacts``, in its result); the operator runs
``check`` and writes the ``ServingReport`` into status.result.serving.
"""

from __future__ import annotations

import re

import yaml
from pydantic import Field

from kubetune_api.schema import ApiModel

SUPPORTED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""
DEFAULT_MAX_RANK = 64
DECODER_LINEAR = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""Attention and MLP projections of Llama-style decoders, which vLLM's LoRA layers cover (packed as qkv_proj, gate_up_proj)."""
SUPPORTED_TARGETS: dict[str, frozenset[str]] = dict.fromkeys(
    (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Phi3ForCausalLM",
        "MixtralForCausalLM",
    ),
    DECODER_LINEAR,
)
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out"})


class AdapterFacts(ApiModel):
    """What the serving check needs to know about a saved adapter (from its adapter_config.json and the base model)."""

    rank: int = Field(ge=1, description="LoRA rank r of the adapter.")
    target_modules: list[str] = Field(max_length=64, description="Module names the adapter patches, as saved in adapter_config.json.")
    modules_to_save: list[str] = Field(default_factory=list, max_length=64, description="Modules saved in full next to the adapter.")
    architecture: str | None = Field(default=None, max_length=128, description="architectures[0] of the base model's config.json.")
    tokenizer_changed: bool = Field(default=False, description="The embedding rows differ from the base model's vocabulary (tokens were added).")


class ServingSettings(ApiModel):
    """Operator-wide limits of the serving fleet (chart values serving.*)."""

    max_lora_rank: int = Field(default=DEFAULT_MAX_RANK, description="Highest --max-lora-rank the vLLM deployment runs with.")
    allow_modules_to_save: bool = Field(default=False, description="Accept adapters with modules_to_save (a vLLM build that loads them).")


class ServingReport(ApiModel):
    """Whether vLLM can serve the adapter, and how."""

    compatible: bool = Field(description="True when every vLLM LoRA rule holds.")
    reasons: list[str] = Field(default_factory=list, max_length=16, description="Each rule the adapter breaks, with what to change.")
    max_lora_rank: int | None = Field(
        default=None, description="The --max-lora-rank value to serve it with: the smallest supported value at or above the rank."
    )
    vllm_args: list[str] = Field(default_factory=list, max_length=16, description="vllm serve arguments that load the base model with this adapter.")
    kserve_inference_service: str | None = Field(default=None, max_length=8192, description="A KServe InferenceService (YAML) that serves it with vLLM.")


def lora_name(namespace: str, name: str) -> str:
    """The name clients pass as ``model`` to reach the adapter: <namespace>-<name>, as a DNS label."""
    return re.sub(r"[^a-z0-9-]", "-", f"{namespace}-{name}".lower()).strip("-")[:63]


def rank_flag(rank: int) -> int | None:
    """The smallest supported --max-lora-rank at or above ``rank``; None above the largest."""
    return next((value for value in SUPPORTED_RANKS if value >= rank), None)


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def violations(facts: AdapterFacts, settings: ServingSettings) -> list[str]:
    """Every vLLM LoRA rule the adapter breaks."""
    reasons: list[str] = []
    flag = rank_flag(facts.rank)
    if flag is None:
        reasons.append(f"rank {facts.rank} is above vLLM's largest --max-lora-rank {SUPPORTED_RANKS[-1]}: lower spec.lora.r")
    elif flag > settings.max_lora_rank:
        reasons.append(f"rank {facts.rank} needs --max-lora-rank {flag}, above the serving limit {settings.max_lora_rank}: lower spec.lora.r")
    leaves = sorted({_leaf(m) for m in facts.target_modules})
    embeddings = [m for m in leaves if m in EMBEDDING_MODULES]
    if embeddings:
        reasons.append(f"target modules {embeddings} are embeddings or lm_head, which vLLM does not load as LoRA: drop them from spec.lora.targetModules")
    supported = SUPPORTED_TARGETS.get(facts.architecture or "")
    if supported is None:
        reasons.append(f"architecture {facts.architecture or 'unknown'} is not one whose LoRA targets are known here; check vLLM's supported models")
    else:
        unknown = [m for m in leaves if m not in supported and m not in EMBEDDING_MODULES]
        if unknown:
            reasons.append(f"target modules {unknown} are not LoRA-capable layers of {facts.architecture} in vLLM; use {sorted(supported)}")
    if facts.modules_to_save and not settings.allow_modules_to_save:
        reasons.append(f"modules_to_save {sorted(facts.modules_to_save)} are full weight copies vLLM refuses in an adapter; remove them")
    if facts.tokenizer_changed:
        reasons.append("the tokenizer differs from the base model's (embeddings were resized); vLLM serves LoRA only with the base tokenizer")
    return reasons


def check(facts: AdapterFacts, settings: ServingSettings, *, base_model: str, adapter_uri: str, namespace: str, name: str) -> ServingReport:
    """The hand-off for one published adapter: compatibility, the vLLM flags and a KServe InferenceService."""
    reasons = violations(facts, settings)
    flag = rank_flag(facts.rank)
    if reasons or flag is None:
        return ServingReport(compatible=False, reasons=reasons, max_lora_rank=flag)
    served = lora_name(namespace, name)
    args = ["--enable-lora", "--lora-modules", f"{served}=/mnt/models", "--max-lora-rank", str(flag)]
    return ServingReport(
        compatible=True,
        max_lora_rank=flag,
        vllm_args=[base_model, *args],
        kserve_inference_service=inference_service(served, namespace, base_model, adapter_uri, args),
    )


def inference_service(served: str, namespace: str, base_model: str, adapter_uri: str, args: list[str]) -> str:
    """KServe's Hugging Face runtime (vLLM backend): the storage initializer brings the adapter to /mnt/models."""
    document = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": served, "namespace": namespace},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "huggingface"},
                    "storageUri": adapter_uri,
                    "args": [f"--model_name={served}", f"--model_id={base_model}", "--backend=vllm", *args],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            }
        },
    }
    return yaml.safe_dump(document, sort_keys=False)
