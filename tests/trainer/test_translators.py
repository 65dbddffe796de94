"""Translators that build transformers and peft objects, and helpers that need torch."""

from __future__ import annotations

import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.recipe import LoraSpec, QuantizationSpec
from kubetune_api.runtime import RuntimeConfig, TrainerEnvironment
from kubetune_trainer.errors import classify

pytestmark = pytest.mark.trainer


def test_quantization_config_4bit_nf4_double_quant() -> None:
    import torch

    from kubetune_trainer.model import quantization_config

    config = quantization_config(QuantizationSpec(bits=4, type="nf4", double_quant=True, compute_dtype="bfloat16"))
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_sharded_qlora_stores_its_4bit_weights_in_the_compute_dtype() -> None:
    """FSDP shards every weight of a group alike: packed 4-bit data in uint8 next to bf16 weights would not be."""
    import torch

    from kubetune_trainer.model import quantization_config

    spec = QuantizationSpec(bits=4, type="nf4", double_quant=True, compute_dtype="bfloat16")
    assert quantization_config(spec, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(spec).bnb_4bit_quant_storage == torch.uint8


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


def test_topology_comes_from_the_runtime_config_and_the_completion_index(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer.distributed import topology

    # What older operators also set on the pod: none of it may change the layout any more.
    for name, value in {"NPROC_PER_NODE": "2", "NNODES": "3", "WORLD_SIZE": "6", "NODE_RANK": "1", "MASTER_ADDR": "elsewhere"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    runtime = RuntimeConfig(gpus_per_node=8, nodes=4, rendezvous_host="job-trainer-0.job-trainer", rendezvous_port=29511)
    topo = topology(runtime, TrainerEnvironment().completion_index)
    assert (topo.nodes, topo.node_rank, topo.processes_per_node, topo.world_size) == (4, 2, 8, 32)
    assert (topo.rendezvous_host, topo.rendezvous_port) == ("job-trainer-0.job-trainer", 29511)
    local = topology(RuntimeConfig(), 0)
    assert (local.nodes, local.node_rank, local.processes_per_node, local.world_size) == (1, 0, 1, 1)
    with pytest.raises(ValueError, match="outside 4 nodes"):
        topology(runtime, 4)


def test_node_rank_is_the_launchers_in_a_worker_and_the_completion_index_otherwise() -> None:
    from kubetune_trainer.distributed import init
    from kubetune_trainer.environment import ProcessEnvironment

    pod = init(False, 3, ProcessEnvironment(world_size=6, group_rank=1))
    assert (pod.node_rank, pod.world_size, pod.rank, pod.local_rank) == (3, 1, 0, 0)
    worker = init(False, 3, ProcessEnvironment(local_rank=0, world_size=1, group_rank=1))
    assert (worker.node_rank, worker.world_size) == (1, 1)


def test_cuda_oom_is_classified_with_advice() -> None:
    import torch

    error = classify(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert error.exit_code is ExitCode.OUT_OF_MEMORY
    assert error.reason == "OutOfMemory"
    assert "perDeviceBatchSize" in error.message and "qlora" in error.message and "gradientCheckpointing" in error.message
