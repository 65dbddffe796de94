"""Pure translators and small helpers of the trainer: spec in, library objects or values out.

Nothing here imports torch at module level; tests that need transformers or peft import them inside.
"""

from __future__ import annotations

import json

import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.recipe import LoraSpec, Precision, QuantizationSpec
from kubetune_api.result import MAX_BYTES, CheckpointRef
from kubetune_api.runtime import RuntimeConfig
from kubetune_trainer.errors import ModelError, TrainerError, classify, redact
from kubetune_trainer.model import model_location, resolve_precision, resolve_target_modules
from kubetune_trainer.result import failure

pytestmark = pytest.mark.unit

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_all_linear_expands_to_every_linear_layer() -> None:
    assert resolve_target_modules(["all-linear"], LLAMA_LINEARS) == LLAMA_LINEARS


def test_named_targets_are_kept_in_order_without_duplicates() -> None:
    assert resolve_target_modules(["v_proj", "q_proj", "v_proj"], LLAMA_LINEARS) == ["v_proj", "q_proj"]


def test_unknown_target_fails_with_the_models_linear_layers() -> None:
    with pytest.raises(ModelError) as raised:
        resolve_target_modules(["q_proj", "qkv"], LLAMA_LINEARS)
    error = raised.value
    assert error.exit_code is ExitCode.MODEL_ERROR
    assert error.reason == "ModelError"
    assert "'qkv'" in error.message and "'q_proj'" not in error.message.split("not found")[0]
    for name in LLAMA_LINEARS:
        assert name in error.message


def test_all_linear_cannot_be_mixed_with_names() -> None:
    with pytest.raises(ModelError, match="cannot be combined"):
        resolve_target_modules(["all-linear", "q_proj"], LLAMA_LINEARS)


@pytest.mark.parametrize(
    ("precision", "cuda", "bf16", "expected"),
    [
        (Precision.AUTO, False, False, Precision.FP32),
        (Precision.BF16, False, False, Precision.FP32),
        (Precision.AUTO, True, True, Precision.BF16),
        (Precision.AUTO, True, False, Precision.FP16),
        (Precision.FP32, True, True, Precision.FP32),
        (Precision.FP16, True, True, Precision.FP16),
    ],
)
def test_precision_resolution(precision: Precision, cuda: bool, bf16: bool, expected: Precision) -> None:
    assert resolve_precision(precision, cuda=cuda, bf16_supported=bf16) is expected


@pytest.mark.parametrize(
    ("source", "kind"),
    [("meta-llama/Llama-3.1-8B", "hub"), ("s3://models/llama/", "s3"), ("/models/llama", "local"), ("gpt2", "hub")],
)
def test_model_location(source: str, kind: str) -> None:
    assert model_location(source) == kind


def test_quantization_config_4bit_nf4_double_quant() -> None:
    import torch

    from kubetune_trainer.model import quantization_config

    config = quantization_config(QuantizationSpec(bits=4, type="nf4", double_quant=True, compute_dtype="bfloat16"))
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_quantization_config_fp4_and_8bit_and_none() -> None:
    import torch

    from kubetune_trainer.model import quantization_config

    fp4 = quantization_config(QuantizationSpec(type="fp4", double_quant=False, compute_dtype="float16"))
    assert fp4.bnb_4bit_quant_type == "fp4" and fp4.bnb_4bit_use_double_quant is False
    assert fp4.bnb_4bit_compute_dtype == torch.float16
    assert quantization_config(QuantizationSpec(bits=8)).load_in_8bit
    assert quantization_config(None) is None


def test_lora_config() -> None:
    from kubetune_trainer.model import lora_config

    config = lora_config(LoraSpec(r=4, alpha=8, dropout=0.1, bias="lora_only", use_rslora=True), ["q_proj", "v_proj"])
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias, config.use_rslora) == (4, 8, 0.1, "lora_only", True)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.task_type == "CAUSAL_LM"


def test_topology_from_pod_environment() -> None:
    from kubetune_trainer.distributed import topology

    env = {"NPROC_PER_NODE": "8", "NNODES": "4", "WORLD_SIZE": "32", "NODE_RANK": "2", "MASTER_ADDR": "job-trainer-0.job-trainer", "MASTER_PORT": "29500"}
    topo = topology(RuntimeConfig(gpus_per_node=8, nodes=4), env)
    assert (topo.nnodes, topo.node_rank, topo.nproc_per_node, topo.world_size) == (4, 2, 8, 32)
    assert topo.master_addr == "job-trainer-0.job-trainer"
    # torchrun's conventions alone: WORLD_SIZE counts processes, the Indexed Job gives the node rank.
    bare = topology(RuntimeConfig(), {"NPROC_PER_NODE": "2", "WORLD_SIZE": "6", "JOB_COMPLETION_INDEX": "1"})
    assert (bare.nnodes, bare.node_rank, bare.world_size) == (3, 1, 6)
    local = topology(RuntimeConfig(), {})
    assert (local.nnodes, local.node_rank, local.nproc_per_node, local.world_size) == (1, 0, 1, 1)


def test_cuda_oom_is_classified_with_advice() -> None:
    import torch

    error = classify(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert error.exit_code is ExitCode.OUT_OF_MEMORY
    assert error.reason == "OutOfMemory"
    assert "perDeviceBatchSize" in error.message and "qlora" in error.message and "gradientCheckpointing" in error.message


def test_errors_of_other_layers_keep_their_exit_code() -> None:
    from kubetune_trainer.data.errors import DataError
    from kubetune_trainer.storage_errors import StorageAccessError

    assert classify(DataError("field 'text' missing")).exit_code is ExitCode.DATA_ERROR
    assert classify(StorageAccessError("bucket missing")).exit_code is ExitCode.STORAGE_ACCESS_ERROR
    unknown = classify(KeyError("boom"))
    assert unknown.exit_code is ExitCode.RUNTIME_ERROR


def test_redact_removes_credentials() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-123", "HF_TOKEN": "hf_abcdefgh"}
    assert redact("auth s3cr3t-value-123 and hf_abcdefgh failed", env) == "auth *** and *** failed"


def test_failure_message_fits_the_kubernetes_limit_and_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key-value")
    error = TrainerError("S3 said very-secret-key-value " + "x" * 10_000, ExitCode.STORAGE_UNAVAILABLE)
    data = failure(error, CheckpointRef(step=30, uri="s3://b/p/checkpoints/step-30/")).encode()
    assert len(data) <= MAX_BYTES
    decoded = json.loads(data)
    assert decoded["status"] == "Failed" and decoded["reason"] == "StorageUnavailable" and decoded["exitCode"] == 4
    assert decoded["lastCheckpoint"] == {"step": 30, "uri": "s3://b/p/checkpoints/step-30/"}
    assert "very-secret-key-value" not in data.decode()
