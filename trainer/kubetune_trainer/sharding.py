"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for spec.training.sharding: fsdp.

Each decoder layer is its own shard group (gathered just before it runs, freed after), the rest of the model is the
root group. With QLoRA the 4-bit weights are stored in the compute dtype (``bnb_4bit_quant_storage``, see
``model.quantization_config``) so every shard holds one dtype; bitsandbytes restores the quantization state of a
gathered weight from its module.

Checkpoints hold what training changes: the adapter and its optimizer state, gathered as full tensors with
``torch.distributed.checkpoint.state_dict`` (frozen base weights are never gathered: they come from the base model),
in the same files as unsharded runs. Loading puts each rank's shard back, so a run resumes on the same world size
(and, since the files are full tensors, on another one too).
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune_api.recipe import Sharding, TrainingSpec
from kubetune_trainer.distributed import Context


def enabled(spec: TrainingSpec, ctx: Context) -> bool:
    """True when this run shards the model: asked for, and more than one process."""
    return spec.sharding is Sharding.FSDP and ctx.distributed


def decoder_layers(peft_model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of the base model, the unit of gathering."""
    base = peft_model.get_base_model()
    decoder = base.get_decoder() if callable(getattr(base, "get_decoder", None)) else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"spec.training.sharding fsdp needs a decoder with a layers list; {type(base).__name__} has none: use sharding none for this model")
    return list(layers)


def shard(loss_model: torch.nn.Module, peft_model: Any, ctx: Context) -> torch.nn.Module:
    """``loss_model`` (wrapping ``peft_model``) sharded across every process of the run, in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Every rank initialised its adapter from its own seed; as DDP does, rank 0's weights are the run's (each rank
    # keeps its slice of them below, so without this the shards would come from different initialisations).
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in decoder_layers(peft_model):
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_model, mesh=mesh)
    return loss_model


def _options(*, cpu_offload: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, cpu_offload=cpu_offload)


def _peft_keys(peft_model: Any, names: list[str]) -> dict[str, str]:
    """Module parameter name -> the key peft uses for it in adapter files (adapter name dropped)."""
    from peft import get_peft_model_state_dict

    # peft renames the entries of the dict it is given; tagging each with its own tensor recovers the mapping.
    tagged = {name: torch.empty(0) for name in names}
    by_tensor = {id(tensor): name for name, tensor in tagged.items()}
    renamed = get_peft_model_state_dict(peft_model, state_dict=tagged)
    return {by_tensor[id(tensor)]: key for key, tensor in renamed.items()}


def gather_trainable(peft_model: Any, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full adapter weights (peft's keys) and optimizer state, on CPU. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimizer_state = get_state_dict(peft_model, optimizer, options=_options(cpu_offload=True))
    keys = _peft_keys(peft_model, list(weights))
    full = {keys[name]: tensor.contiguous() for name, tensor in weights.items() if name in keys and isinstance(tensor, torch.Tensor)}
    return full, dict(optimizer_state)


def load_trainable(peft_model: Any, optimizer: torch.optim.Optimizer, adapter: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
    """Put full adapter weights and optimizer state (as ``gather_trainable`` returns them) back into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    by_key = {key: name for name, key in _peft_keys(peft_model, trainable).items()}
    missing = sorted(set(by_key) - set(adapter))
    if missing:
        raise ValueError(f"the checkpoint does not match the adapter layout (missing {missing[:5]})")
    weights: dict[str, Any] = {by_key[key]: tensor for key, tensor in adapter.items() if key in by_key}
    set_state_dict(peft_model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state, options=_options())
