"""The chunked loss equals the model's own loss and gradients, and keeps far less memory alive."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune_trainer.loss import LossModel, chunked_cross_entropy, supports_chunked_loss

pytestmark = pytest.mark.trainer


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 48), generator=generator)
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt without loss
    labels[1, 30:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def test_chunked_loss_and_gradients_match_the_model() -> None:
    model = small_llama()
    reference = model(**batch()).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    wrapped = LossModel(model, chunk_tokens=7, chunk_above_bytes=0)
    assert wrapped.chunked
    loss = wrapped(**batch())
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_targets_gives_zero_loss_with_a_graph() -> None:
    head = torch.nn.Linear(8, 16)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = chunked_cross_entropy(head, hidden, torch.full((1, 4), -100))
    torch.autograd.backward(loss)
    assert loss.item() == 0.0


def test_small_logits_use_the_model_loss() -> None:
    model = small_llama()
    wrapped = LossModel(model)
    assert wrapped.chunked and wrapped.vocab_size == 512
    torch.testing.assert_close(wrapped(**batch()), model(**batch()).loss)


def test_soft_capped_models_keep_their_own_loss() -> None:
    model = small_llama()
    model.config.final_logit_softcapping = 30.0
    assert not supports_chunked_loss(model)
    wrapped = LossModel(model)
    torch.testing.assert_close(wrapped(**batch()), model(**batch()).loss)
