"""The serving hand-off: one test per vLLM LoRA rule, the flags and KServe manifest, and status.result.serving."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune_api.serving import AdapterFacts, ServingSettings, check, lora_name, rank_flag, violations
from kubetune_operator.status import compute_status
from tests.unit.test_status import cond, ftj, job, observe, pod, terminated

pytestmark = pytest.mark.unit

LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def facts(**changes: Any) -> AdapterFacts:
    return AdapterFacts(rank=16, target_modules=LLAMA_TARGETS, architecture="LlamaForCausalLM").model_copy(update=changes)


def test_an_all_linear_llama_adapter_is_compatible() -> None:
    assert violations(facts(), ServingSettings()) == []


@pytest.mark.parametrize(("rank", "flag"), [(1, 1), (4, 8), (8, 8), (12, 16), (64, 64), (300, 320), (512, 512), (513, None)])
def test_the_rank_flag_is_the_smallest_supported_value_at_or_above_the_rank(rank: int, flag: int | None) -> None:
    assert rank_flag(rank) == flag


def test_a_rank_above_the_serving_limit_is_refused() -> None:
    (reason,) = violations(facts(rank=100), ServingSettings(max_lora_rank=64))
    assert "--max-lora-rank 128" in reason and "limit 64" in reason and "spec.lora.r" in reason
    assert violations(facts(rank=100), ServingSettings(max_lora_rank=128)) == []


def test_a_rank_above_every_supported_value_is_refused() -> None:
    (reason,) = violations(facts(rank=1024), ServingSettings(max_lora_rank=512))
    assert "largest --max-lora-rank 512" in reason


def test_lm_head_and_embedding_targets_are_refused() -> None:
    (reason,) = violations(facts(target_modules=[*LLAMA_TARGETS, "lm_head", "model.embed_tokens"]), ServingSettings())
    assert "embed_tokens" in reason and "lm_head" in reason and "spec.lora.targetModules" in reason


def test_targets_vllm_cannot_patch_for_the_architecture_are_refused() -> None:
    (reason,) = violations(facts(target_modules=["q_proj", "rotary_emb"]), ServingSettings())
    assert "rotary_emb" in reason and "LlamaForCausalLM" in reason


def test_an_unknown_architecture_is_not_called_compatible() -> None:
    (reason,) = violations(facts(architecture="GPT2LMHeadModel"), ServingSettings())
    assert "GPT2LMHeadModel" in reason


def test_modules_to_save_are_refused_unless_allowed() -> None:
    with_copies = facts(modules_to_save=["lm_head"])
    (reason,) = violations(with_copies, ServingSettings())
    assert "modules_to_save" in reason
    assert violations(with_copies, ServingSettings(allow_modules_to_save=True)) == []


def test_a_changed_tokenizer_is_refused() -> None:
    (reason,) = violations(facts(tokenizer_changed=True), ServingSettings())
    assert "tokenizer" in reason


def test_the_hand_off_gives_vllm_flags_and_a_kserve_inference_service() -> None:
    report = check(facts(rank=12), ServingSettings(), base_model="meta-llama/Llama-3.1-8B", adapter_uri="s3://a/r/adapter/", namespace="Team_A", name="llama")
    assert report.compatible and report.max_lora_rank == 16
    assert report.vllm_args == ["meta-llama/Llama-3.1-8B", "--enable-lora", "--lora-modules", "team-a-llama=/mnt/models", "--max-lora-rank", "16"]
    service = yaml.safe_load(report.kserve_inference_service or "")
    assert service["kind"] == "InferenceService" and service["metadata"] == {"name": "team-a-llama", "namespace": "Team_A"}
    model = service["spec"]["predictor"]["model"]
    assert model["storageUri"] == "s3://a/r/adapter/" and "--model_id=meta-llama/Llama-3.1-8B" in model["args"] and "--enable-lora" in model["args"]
    assert lora_name("ns", "x.y") == "ns-x-y"


def test_an_incompatible_adapter_gets_reasons_and_no_flags() -> None:
    report = check(facts(modules_to_save=["lm_head"]), ServingSettings(), base_model="b", adapter_uri="s3://a/", namespace="n", name="x")
    assert not report.compatible and report.reasons and not report.vllm_args and report.kserve_inference_service is None


def test_status_result_carries_the_serving_hand_off() -> None:
    result = {"adapterUri": "s3://adapters/runs/team-a/llama/adapter/", "adapter": facts().to_api()}
    message = {"status": "Succeeded", "reason": "Succeeded", "exitCode": 0, "result": result}
    done = job([cond("Complete", "CompletionsReached")], succeeded=1)
    status = compute_status(ftj(), observe(job=done, pods=[pod("Succeeded", state=terminated(0, message, reason="Completed"))]))
    serving = status["result"]["serving"]
    assert serving["compatible"] is True and serving["maxLoraRank"] == 16
    assert serving["vllmArgs"][0] == "meta-llama/Llama-3.1-8B" and "team-a-llama=/mnt/models" in serving["vllmArgs"]
