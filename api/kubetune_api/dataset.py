"""The dataset part of the recipe: where records come from and how they become token sequences."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from kubetune_api.messages import message
from kubetune_api.schema import ApiModel, cel, check_source, source_rules, validations


class DatasetFormat(StrEnum):
    TEXT = "text"
    INSTRUCTION = "instruction"
    CHAT = "chat"


class InstructionFormat(ApiModel):
    """How instruction records (prompt and response fields) become training text."""

    prompt_field: str = Field(default="prompt", max_length=128, description="Record field holding the instruction or prompt.")
    response_field: str = Field(default="response", max_length=128, description="Record field holding the expected answer.")
    system_field: str | None = Field(default=None, max_length=128, description="Optional record field holding a system prompt.")
    template: str = Field(
        default="{system}### Instruction:\n{prompt}\n\n### Response:\n",
        max_length=4096,
        description=(
            "Prompt template with the placeholders {prompt} and {system} (empty when absent). The "
            "response follows it; loss is computed on the response tokens only."
        ),
    )


class ChatFormat(ApiModel):
    """How chat records (a list of role/content messages) become training text."""

    messages_field: str = Field(default="messages", max_length=128, description="Record field holding the list of {role, content} messages.")


class EvalSpec(ApiModel):
    """The evaluation set: a share of the training data, or a separate source."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.ratio) != has(self.source)",
                message("dataset.eval.one_of"),
            )
        )
    )

    ratio: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Share of the training records held out for evaluation, between 0 and 1 (for example 0.05).",
    )
    source: str | None = Field(
        default=None,
        max_length=1024,
        description="A separate evaluation dataset, in the same forms as spec.dataset.source.",
        json_schema_extra=source_rules("spec.dataset.eval.source"),
    )
    split: str = Field(default="validation", max_length=128, description="Split of a Hugging Face evaluation source.")

    @field_validator("source")
    @classmethod
    def _check_source(cls, source: str | None) -> str | None:
        return None if source is None else check_source(source, "spec.dataset.eval.source")


class DatasetSpec(ApiModel):
    """The training data and how records become token sequences."""

    source: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Where the data comes from: a Hugging Face dataset id, an s3:// object or prefix of "
            "jsonl/json/parquet/csv files (read with spec.output's endpoint and credentials), or an "
            "absolute local path to such a file or folder."
        ),
        json_schema_extra=source_rules("spec.dataset.source"),
    )
    config: str | None = Field(default=None, max_length=256, description="Configuration (subset) name of a Hugging Face dataset.")
    split: str = Field(default="train", max_length=128, description="Split of a Hugging Face dataset used for training.")
    file_format: Literal["jsonl", "json", "parquet", "csv"] | None = Field(
        default=None,
        description="File format of s3:// or local files. Inferred from the file extension when unset.",
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.TEXT,
        description=(
            "How records are read: 'text' (one text field), 'instruction' (prompt/response fields and a "
            "template; loss on the response only) or 'chat' (a messages list rendered with the tokenizer's "
            "chat template; loss on assistant turns only)."
        ),
    )
    text_field: str = Field(default="text", max_length=128, description="Record field holding the text, for format 'text'.")
    instruction: InstructionFormat = Field(
        default_factory=InstructionFormat,
        description="Field names and template for format 'instruction'.",
    )
    chat: ChatFormat = Field(default_factory=ChatFormat, description="Field names for format 'chat'.")
    eval: EvalSpec | None = Field(default=None, description="Evaluation set. Without it no evaluation runs.")
    max_samples: int | None = Field(
        default=None,
        ge=1,
        description="Use at most this many training records (taken after shuffling with the training seed).",
    )
    packing: bool = Field(
        default=True,
        description=(
            "Pack several records into each sequence of maxSeqLength tokens for throughput. Records do "
            "not attend to each other: positions restart at each record boundary."
        ),
    )
    max_seq_length: int = Field(
        default=2048,
        ge=16,
        le=131072,
        description="Maximum tokens per training sequence; longer records are truncated.",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, source: str) -> str:
        return check_source(source, "spec.dataset.source")
