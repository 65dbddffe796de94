"""The three record formats turned into token ids plus a loss mask.

- text: the text field, BOS (if the tokenizer adds one) + text + EOS, every token a target.
- instruction: the template with {prompt} and {system} filled in, then the response + EOS; only
  the response and EOS are targets. {system} is the system text followed by a blank line, or empty.
- chat: the messages rendered with the tokenizer's chat template; only the assistant turns (with
  their end-of-turn tokens) are targets. Assistant spans come from rendering the conversation
  prefix by prefix and mapping character spans to tokens through the tokenizer's offsets; a template
  whose prefixes do not render as prefixes falls back to its {% generation %} markers.

Records longer than max_seq_length are cut to it and counted; records left without any target
token (a prompt that fills the whole window, a conversation without an assistant turn) are dropped
and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import numpy.typing as npt

from kubetune_api.dataset import DatasetFormat, DatasetSpec
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.records import TokenizedRecords

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
BATCH = 1000


@dataclass(frozen=True)
class TokenizeStats:
    truncated_records: int
    dropped_records: int


def tokenize_records(records: datasets.Dataset, spec: DatasetSpec, tokenizer: Any, *, shown_as: str) -> tuple[TokenizedRecords, TokenizeStats]:
    """Tokenize every record of ``records`` in the format of ``spec``."""
    if len(records) == 0:
        raise DataError(f"dataset {shown_as} has no records: check spec.dataset.source (and split/config for Hugging Face datasets)")
    # Kept as compact numpy arrays batch by batch: Python int lists would take ~40 bytes a token.
    ids: list[npt.NDArray[np.int32]] = []
    masks: list[npt.NDArray[np.bool_]] = []
    truncated = dropped = 0
    max_len = spec.max_seq_length
    for start, rows in _row_batches(records, _required_fields(spec), shown_as):
        if spec.format is DatasetFormat.TEXT:
            pairs = _text(rows[spec.text_field], tokenizer, start, spec.text_field)
        elif spec.format is DatasetFormat.INSTRUCTION:
            pairs = _instruction(rows, spec, tokenizer, start)
        else:
            pairs = _chats(rows[spec.chat.messages_field], tokenizer, start, spec.chat.messages_field)
        for record_ids, record_mask in pairs:
            if len(record_ids) > max_len:
                truncated += 1
                record_ids, record_mask = record_ids[:max_len], record_mask[:max_len]
            # Position 0 has no prediction, so a record needs a target after its first token.
            if not any(record_mask[1:]):
                dropped += 1
                continue
            ids.append(np.asarray(record_ids, dtype=np.int32))
            masks.append(np.asarray(record_mask, dtype=np.bool_))
    return TokenizedRecords.from_lists(ids, masks), TokenizeStats(truncated, dropped)


def _required_fields(spec: DatasetSpec) -> list[str]:
    if spec.format is DatasetFormat.TEXT:
        return [spec.text_field]
    if spec.format is DatasetFormat.INSTRUCTION:
        fields = [spec.instruction.prompt_field, spec.instruction.response_field]
        return fields + ([spec.instruction.system_field] if spec.instruction.system_field else [])
    return [spec.chat.messages_field]


def _absent_field(where: str, field: str, present: Iterable[str]) -> DataError:
    return DataError(
        f"{where} has no field '{field}'; fields present: {', '.join(present) or 'none'}. "
        "Rename the field in the data or point spec.dataset at the right one (textField, instruction.*Field, chat.messagesField)"
    )


def _row_batches(records: datasets.Dataset, fields: list[str], shown_as: str) -> Iterable[tuple[int, dict[str, list[Any]]]]:
    present = list(records.column_names)
    for field in fields:
        if field not in present:
            raise _absent_field(f"dataset {shown_as}", field, present)
    columns = records.select_columns(fields)
    for start in range(0, len(columns), BATCH):
        yield start, columns[start : start + BATCH]


def _string(value: Any, index: int | str, field: str) -> str:
    if not isinstance(value, str):
        kind = "missing (null)" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{_where(index)}: field '{field}' is {kind}, expected a string; fix or remove that record")
    return value


def _where(index: int | str) -> str:
    """A record's place: a file and line (or row) from validation, else its index among the loaded records."""
    return index if isinstance(index, str) else f"record {index}"


def check_record(record: Mapping[str, Any], spec: DatasetSpec, where: str) -> None:
    """Raise a DataError naming ``where`` when a raw record cannot be read in the format of ``spec``."""
    # The system field may be absent from a record; every other field the format reads must be there.
    optional = spec.instruction.system_field if spec.format is DatasetFormat.INSTRUCTION else None
    for field in _required_fields(spec):
        if field not in record and field != optional:
            raise _absent_field(where, field, record)
    if spec.format is DatasetFormat.TEXT:
        _string(record.get(spec.text_field), where, spec.text_field)
    elif spec.format is DatasetFormat.INSTRUCTION:
        fmt = spec.instruction
        _string(record.get(fmt.prompt_field), where, fmt.prompt_field)
        _string(record.get(fmt.response_field), where, fmt.response_field)
        if fmt.system_field and record.get(fmt.system_field) is not None:
            _string(record.get(fmt.system_field), where, fmt.system_field)
    else:
        _messages(record.get(spec.chat.messages_field), where, spec.chat.messages_field)


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def _text(texts: Sequence[Any], tokenizer: Any, start: int, field: str) -> list[tuple[list[int], list[bool]]]:
    checked = [_string(t, start + i, field) for i, t in enumerate(texts)]
    encoded = tokenizer(checked, add_special_tokens=True)["input_ids"]
    eos = _eos(tokenizer)
    out = []
    for e in encoded:
        # Some tokenizers' post-processors end every encoding with EOS already.
        ids = list(e) if eos and list(e[-1:]) == eos else list(e) + eos
        out.append((ids, [True] * len(ids)))
    return out


def render_prompt(template: str, prompt: str, system: str) -> str:
    # str.replace, not str.format: user templates may contain other braces (JSON examples, code).
    return template.replace("{system}", f"{system}\n\n" if system else "").replace("{prompt}", prompt)


def _instruction(rows: dict[str, list[Any]], spec: DatasetSpec, tokenizer: Any, start: int) -> list[tuple[list[int], list[bool]]]:
    fmt = spec.instruction
    prompts = [_string(p, start + i, fmt.prompt_field) for i, p in enumerate(rows[fmt.prompt_field])]
    responses = [_string(r, start + i, fmt.response_field) for i, r in enumerate(rows[fmt.response_field])]
    systems = [""] * len(prompts)
    if fmt.system_field:
        systems = ["" if s is None else _string(s, start + i, fmt.system_field) for i, s in enumerate(rows[fmt.system_field])]
    texts = [render_prompt(fmt.template, p, s) for p, s in zip(prompts, systems, strict=True)]
    # Prompt and response are tokenized apart so the mask covers exactly the response tokens.
    prompt_ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    eos = _eos(tokenizer)
    out = []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        target = list(r) + eos
        out.append((list(p) + target, [False] * len(p) + [True] * len(target)))
    return out


def _messages(value: Any, index: int | str, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        # CSV and some parquet exports keep the conversation as a JSON string.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{_where(index)}: field '{field}' is a string that is not a JSON list of messages ({error})") from error
    if not isinstance(value, list) or not value:
        got = "nothing" if value is None else type(value).__name__
        raise DataError(f"{_where(index)}: field '{field}' must be a non-empty list of {{role, content}} messages, got {got}")
    messages = []
    for turn, message in enumerate(value):
        where = f"{_where(index)}, message {turn}"
        if not isinstance(message, dict):
            raise DataError(f"{where}: expected an object with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: role {role!r} is not one of {', '.join(sorted(CHAT_ROLES))}")
        if not isinstance(content, str):
            got = "nothing" if content is None else type(content).__name__
            raise DataError(f"{where}: 'content' must be a string, got {got}; keys present: {', '.join(message)}")
        messages.append({"role": role, "content": content})
    return messages


def _chats(values: Sequence[Any], tokenizer: Any, start: int, field: str) -> list[tuple[list[int], list[bool]]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("format 'chat' needs a tokenizer with a chat template; this model's tokenizer has none: use format 'instruction' or an instruct model")
    rendered: dict[int, tuple[str, list[tuple[int, int]]]] = {}
    out: dict[int, tuple[list[int], list[bool]]] = {}
    for offset, value in enumerate(values):
        messages = _messages(value, start + offset, field)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = _assistant_spans(messages, tokenizer, full)
        if spans is None:
            out[offset] = _chat_by_markers(messages, tokenizer, start + offset)
        else:
            rendered[offset] = (full, spans)
    # One batched call: the fast tokenizer encodes the batch in parallel.
    order = list(rendered)
    encoded = tokenizer([rendered[o][0] for o in order], add_special_tokens=False, return_offsets_mapping=True) if order else None
    for position, offset in enumerate(order):
        assert encoded is not None
        spans = rendered[offset][1]
        out[offset] = (list(encoded["input_ids"][position]), _span_mask(encoded["offset_mapping"][position], spans))
    return [out[o] for o in range(len(values))]


def _span_mask(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens that start inside one of the (sorted, disjoint) character spans."""
    mask = []
    span = 0
    for begin, _ in offsets:
        while span < len(spans) and begin >= spans[span][1]:
            span += 1
        mask.append(span < len(spans) and spans[span][0] <= begin)
    return mask


def _assistant_spans(messages: list[dict[str, str]], tokenizer: Any, full: str) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in ``full``, or None when prefixes do not render as prefixes."""
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True) if turn else ""
        through = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            return None
        spans.append((len(before), len(through)))
    return spans


def _chat_by_markers(messages: list[dict[str, str]], tokenizer: Any, index: int) -> tuple[list[int], list[bool]]:
    if "{% generation %}" not in (tokenizer.chat_template or "").replace("{%- generation %}", "{% generation %}"):
        raise DataError(
            f"record {index}: the tokenizer's chat template renders a conversation differently from its prefixes and has no "
            "{% generation %} markers, so assistant turns cannot be located: use a template with generation markers"
        )
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
