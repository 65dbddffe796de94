"""A small random-initialised Llama-shaped model and a BPE tokenizer, built offline.

Tests, the demo and the benchmarks cannot download models, so they build one here: the tokenizer
is trained with ``tokenizers`` on the English corpus in ``corpus.txt`` beside this module and the
model weights come from a seeded initialiser. The same seed gives the same files.

    python -m tinymodel --out DIR [--preset tiny|bench] [--seed N]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
UNK = "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

# Role markers are plain text so that the chat template works with any tokenizer built here.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """Shape of a generated model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    initializer_range: float


PRESETS: dict[str, Preset] = {
    # About 1M parameters: a CPU training step takes milliseconds.
    "tiny": Preset(
        vocab_size=1024,
        hidden_size=128,
        # A multiple of 64: bitsandbytes repacks 4-bit weights in 32-row, 64-column blocks for CPU inference.
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # Llama's 0.02 leaves a frozen random head unable to express confident predictions at
        # this width, so LoRA could barely lower the loss; ~1/sqrt(hidden) can.
        initializer_range=0.1,
    ),
    # About 30M parameters: large enough that throughput comparisons mean something.
    "bench": Preset(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        initializer_range=0.05,
    ),
}


def corpus_lines() -> list[str]:
    """Lines of the English corpus, without blanks."""
    text = resources.files("tinymodel").joinpath("corpus.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE tokenizer trained on the corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    # A BOS token starts every encoded text, as Llama tokenizers do; no EOS is added implicitly.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    fast: Any = PreTrainedTokenizerFast
    wrapped = fast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build(out: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a tokenizer and a seeded random Llama model to ``out`` (save_pretrained layout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = PRESETS[preset]
    tokenizer = build_tokenizer(shape.vocab_size, shape.max_position_embeddings)
    vocab_size = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=shape.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a random-initialised Llama-shaped model and its tokenizer.")
    parser.add_argument("--out", type=Path, required=True, help="Folder to write the model and tokenizer into.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="Model size: tiny (~1M params) or bench (~30M).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weight initialisation.")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    path = build(args.out, args.preset, args.seed)
    print(path)
    return 0
