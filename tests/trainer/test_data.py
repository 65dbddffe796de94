"""prepare_data end to end: sources (local files, S3 through a real endpoint), formats, loss masks, errors, splits."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.output import OutputSpec
from kubetune_api.runtime import TrainerConfig, TrainerEnvironment
from kubetune_trainer.data import prepare as prepare_module
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.packing import IGNORE_INDEX
from kubetune_trainer.data.prepare import PreparedData, prepare_data
from kubetune_trainer.data.validate import MAX_LINE_BYTES
from kubetune_trainer.storage.store import S3Store
from tinymodel import build_tokenizer

if TYPE_CHECKING:
    from tests.support.s3 import MotoS3Server

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "data"


@functools.cache
def _tokenizer() -> Any:
    return build_tokenizer(1024, 2048)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return _tokenizer()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_records(records: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(records).to_csv(str(path), index=False)
    return path


def make_config(
    source: str | Path,
    tmp_path: Path,
    *,
    output: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    work: str = "work",
    **dataset: Any,
) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"source": "/models/tiny"},
            "dataset": {"source": str(source), "maxSeqLength": 64, **dataset},
            "training": {"maxSteps": 10, **(training or {})},
            "output": output or {"bucket": "unused"},
            "runtime": {"workDir": str(tmp_path / work)},
        }
    )


def targets_per_record(data: PreparedData, tokenizer: Any) -> list[str]:
    """The decoded target tokens of every training record (label != -100), packing undone."""
    texts = []
    for index in range(len(data.train)):
        example = data.train[index]
        starts = [i for i, p in enumerate(example["position_ids"].tolist()) if p == 0] + [len(example["input_ids"])]
        for begin, end in zip(starts, starts[1:], strict=False):
            labels = example["labels"][begin:end]
            texts.append(tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()))
    return texts


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_text_records_from_local_files(suffix: str, tmp_path: Path, tokenizer: Any) -> None:
    records = read_jsonl(SAMPLES / "memorise.jsonl")
    path = write_records(records, tmp_path / f"memorise{suffix}")
    data = prepare_data(make_config(path, tmp_path, format="text"), tokenizer)
    assert data.num_train_records == len(records)
    assert data.truncated_records == 0
    # BOS has no prediction; every other token, EOS included, is a target.
    assert sorted(targets_per_record(data, tokenizer)) == sorted(r["text"] + "</s>" for r in records)


def test_folder_of_jsonl_shards(tmp_path: Path, tokenizer: Any) -> None:
    records = read_jsonl(SAMPLES / "memorise.jsonl")
    write_records(records[:10], tmp_path / "data" / "part-0.jsonl")
    write_records(records[10:], tmp_path / "data" / "part-1.jsonl")
    data = prepare_data(make_config(tmp_path / "data", tmp_path), tokenizer)
    assert data.num_train_records == len(records)


def test_instruction_loss_covers_exactly_the_response_and_eos(tmp_path: Path, tokenizer: Any) -> None:
    records = read_jsonl(SAMPLES / "instructions.jsonl")
    config = make_config(SAMPLES / "instructions.jsonl", tmp_path, format="instruction", packing=False, instruction={"systemField": "system"})
    data = prepare_data(config, tokenizer)
    assert data.num_train_records == len(records)
    by_response = {r["response"]: r for r in records}
    for index in range(len(data.train)):
        example = data.train[index]
        ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
        targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert targets == list(range(targets[0], len(ids))), "targets form one block at the end"
        response = tokenizer.decode(ids[targets[0] : -1])
        record = by_response[response]
        assert ids[-1] == tokenizer.eos_token_id
        assert len(targets) == len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
        prompt = tokenizer.decode(ids[: targets[0]], skip_special_tokens=True)
        system = f"{record['system']}\n\n" if "system" in record else ""
        assert prompt == f"{system}### Instruction:\n{record['prompt']}\n\n### Response:\n"


def test_chat_loss_covers_exactly_the_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    records = read_jsonl(SAMPLES / "chat.jsonl")
    data = prepare_data(make_config(SAMPLES / "chat.jsonl", tmp_path, format="chat", packing=False, maxSeqLength=256), tokenizer)
    assert data.num_train_records == len(records)
    expected = sorted("".join(m["content"] + "</s>\n" for m in r["messages"] if m["role"] == "assistant") for r in records)
    assert sorted(targets_per_record(data, tokenizer)) == expected
    for index in range(len(data.train)):
        example = data.train[index]
        rendered = tokenizer.decode(example["input_ids"].tolist())
        assert rendered.startswith("<s><|")
        masked = [t for t, label in zip(example["input_ids"].tolist(), example["labels"].tolist(), strict=True) if label == IGNORE_INDEX]
        assert "<|assistant|>" in tokenizer.decode(masked), "the role header itself is not a target"


def test_chat_from_csv_with_json_encoded_messages(tmp_path: Path, tokenizer: Any) -> None:
    records = [{"messages": json.dumps(r["messages"])} for r in read_jsonl(SAMPLES / "chat.jsonl")]
    path = write_records(records, tmp_path / "chat.csv")
    data = prepare_data(make_config(path, tmp_path, format="chat"), tokenizer)
    assert data.num_train_records == len(records)


def s3_factory(server: MotoS3Server) -> Any:
    def build(output: OutputSpec) -> S3Store:
        return S3Store.from_output(output, environment=TrainerEnvironment.model_validate(server.env()))

    return build


def test_s3_object_and_prefix_sources(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path, tokenizer: Any) -> None:
    client = s3_server.client()
    client.upload_file(str(SAMPLES / "instructions.jsonl"), s3_bucket, "datasets/instructions.jsonl")
    records = read_jsonl(SAMPLES / "memorise.jsonl")
    for part, chunk in enumerate([records[:7], records[7:]]):
        shard = write_records(chunk, tmp_path / f"part-{part}.parquet")
        client.upload_file(str(shard), s3_bucket, f"datasets/memorise/part-{part}.parquet")
    # The dataset bucket differs from the output bucket: the store is built for the source's bucket.
    output = {"bucket": "adapters", "endpointUrl": s3_server.endpoint_url, "region": "us-east-1"}

    data = prepare_data(
        make_config(f"s3://{s3_bucket}/datasets/instructions.jsonl", tmp_path, format="instruction", output=output),
        tokenizer,
        store_factory=s3_factory(s3_server),
    )
    assert data.num_train_records == len(read_jsonl(SAMPLES / "instructions.jsonl"))

    data = prepare_data(
        make_config(f"s3://{s3_bucket}/datasets/memorise/", tmp_path, format="text", output=output),
        tokenizer,
        store_factory=s3_factory(s3_server),
    )
    assert data.num_train_records == len(records)
    assert sorted(targets_per_record(data, tokenizer)) == sorted(r["text"] + "</s>" for r in records)

    # Without the trailing slash a key that is no object is read as a prefix.
    data = prepare_data(
        make_config(f"s3://{s3_bucket}/datasets/memorise", tmp_path, format="text", output=output, work="no-slash"),
        tokenizer,
        store_factory=s3_factory(s3_server),
    )
    assert data.num_train_records == len(records)

    with pytest.raises(DataError, match=f"no object or prefix at s3://{s3_bucket}/datasets/missing.jsonl"):
        prepare_data(
            make_config(f"s3://{s3_bucket}/datasets/missing.jsonl", tmp_path, output=output),
            tokenizer,
            store_factory=s3_factory(s3_server),
        )


def expect_data_error(config: TrainerConfig, tokenizer: Any) -> str:
    with pytest.raises(DataError) as caught:
        prepare_data(config, tokenizer)
    assert caught.value.exit_code is ExitCode.DATA_ERROR
    return caught.value.message


def test_missing_field_is_named_with_the_fields_present(tmp_path: Path, tokenizer: Any) -> None:
    message = expect_data_error(make_config(SAMPLES / "instructions.jsonl", tmp_path, format="text"), tokenizer)
    # The first record lacks the field; it is named by its file and line, with the fields that line has.
    assert "instructions.jsonl line 1 has no field 'text'" in message
    assert "fields present: prompt, response." in message


def test_empty_dataset_is_a_data_error(tmp_path: Path, tokenizer: Any) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert "is empty" in expect_data_error(make_config(empty, tmp_path), tokenizer)


def test_unknown_extension_asks_for_file_format(tmp_path: Path, tokenizer: Any) -> None:
    odd = tmp_path / "records.txt"
    odd.write_text('{"text": "a"}\n', encoding="utf-8")
    assert "set spec.dataset.fileFormat" in expect_data_error(make_config(odd, tmp_path), tokenizer)
    data = prepare_data(make_config(odd, tmp_path, fileFormat="jsonl"), tokenizer)
    assert data.num_train_records == 1


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "bad.jsonl line 1, message 1: 'content' must be a string"),
        ([{"role": "narrator", "content": "once"}], "role 'narrator' is not one of"),
        ("not json", "is a string that is not a JSON list"),
    ],
)
def test_malformed_chat_message(messages: Any, complaint: str, tmp_path: Path, tokenizer: Any) -> None:
    path = write_records([{"messages": messages}], tmp_path / "bad.jsonl")
    assert complaint in expect_data_error(make_config(path, tmp_path, format="chat"), tokenizer)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b'{"text": "unfinished', "shard.jsonl line 2, column 10: not valid JSON"),
        (b'{"text": "caf\xe9"}', "shard.jsonl line 2: byte 14 of the line is not UTF-8"),
        (b'{"text": "' + b"a" * MAX_LINE_BYTES + b'"}', "shard.jsonl line 2 is longer than 64 MiB"),
    ],
    ids=["malformed-json", "not-utf8", "over-long"],
)
def test_the_trainers_own_loading_names_the_file_and_line(line: bytes, complaint: str, tmp_path: Path, tokenizer: Any) -> None:
    """The trainer's loading and the preparation step share one validation (data/validate.py)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "shard.jsonl").write_bytes(b'{"text": "one"}\n' + line + b'\n{"text": "three"}\n')
    message = expect_data_error(make_config(folder, tmp_path), tokenizer)
    assert f"{folder}/shard.jsonl" in message and complaint in message, message[:300]


def test_long_records_are_truncated_and_counted(tmp_path: Path, tokenizer: Any) -> None:
    records = read_jsonl(SAMPLES / "memorise.jsonl")
    long_text = " ".join(r["text"] for r in records)
    path = write_records([*records[:3], {"text": long_text}], tmp_path / "long.jsonl")
    data = prepare_data(make_config(path, tmp_path, maxSeqLength=16), tokenizer)
    assert data.truncated_records == 4
    assert all(len(data.train[i]["input_ids"]) <= 16 for i in range(len(data.train)))


def test_eval_ratio_split_sizes_and_max_samples(tmp_path: Path, tokenizer: Any) -> None:
    source = SAMPLES / "memorise.jsonl"
    data = prepare_data(make_config(source, tmp_path, eval={"ratio": 0.25}), tokenizer)
    assert (data.num_train_records, data.num_eval_records) == (12, 4)
    train_texts, eval_texts = set(targets_per_record(data, tokenizer)), set()
    assert data.eval is not None
    for batch in data.eval_batches(8):
        for row, labels in enumerate(batch.inputs["labels"]):
            positions = batch.inputs["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for begin, end in zip(starts, starts[1:], strict=False):
                span = labels[begin:end]
                if (span != IGNORE_INDEX).any():
                    eval_texts.add(tokenizer.decode(span[span != IGNORE_INDEX].tolist()))
    assert len(eval_texts) == 4
    assert not train_texts & eval_texts

    limited = prepare_data(make_config(source, tmp_path, maxSamples=10, eval={"ratio": 0.2}), tokenizer)
    assert (limited.num_train_records, limited.num_eval_records) == (8, 2)
    again = prepare_data(make_config(source, tmp_path, maxSamples=10, eval={"ratio": 0.2}, work="again"), tokenizer)
    assert targets_per_record(again, tokenizer) == targets_per_record(limited, tokenizer)
    reseeded = prepare_data(make_config(source, tmp_path, maxSamples=10, eval={"ratio": 0.2}, training={"seed": 1}, work="again"), tokenizer)
    assert set(targets_per_record(reseeded, tokenizer)) != set(targets_per_record(limited, tokenizer))


def test_eval_from_a_separate_source(tmp_path: Path, tokenizer: Any) -> None:
    held_out = write_records(read_jsonl(SAMPLES / "memorise.jsonl")[:3], tmp_path / "held-out.jsonl")
    data = prepare_data(make_config(SAMPLES / "memorise.jsonl", tmp_path, eval={"source": str(held_out)}), tokenizer)
    assert (data.num_train_records, data.num_eval_records) == (16, 3)


def test_steps_per_epoch_counts_micro_batches_per_rank(tmp_path: Path, tokenizer: Any) -> None:
    data = prepare_data(make_config(SAMPLES / "memorise.jsonl", tmp_path, packing=False), tokenizer, rank=1, world_size=2)
    assert len(data.train) == 16
    assert data.batches_per_epoch(3) == 3  # 8 examples on each rank
    assert data.steps_per_epoch(3, 2) == 2
    stream = data.train_batches(3)
    assert sum(next(stream).inputs["input_ids"].shape[0] for _ in range(3)) == 8


MARKED_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{{ 'turns: ' + (messages | length | string) }}"
)
"""A template whose prefixes are not prefixes of the whole rendering (the trailer counts turns), with generation markers."""


def test_chat_template_without_consistent_prefixes_uses_generation_markers(tmp_path: Path, tokenizer: Any) -> None:
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = MARKED_TEMPLATE
    records = read_jsonl(SAMPLES / "chat.jsonl")
    data = prepare_data(make_config(SAMPLES / "chat.jsonl", tmp_path, format="chat", packing=False, maxSeqLength=256), marked)
    expected = sorted("".join(m["content"] + "</s>" for m in r["messages"] if m["role"] == "assistant") for r in records)
    assert sorted(targets_per_record(data, marked)) == expected

    marked.chat_template = MARKED_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    message = expect_data_error(make_config(SAMPLES / "chat.jsonl", tmp_path, format="chat"), marked)
    assert "generation markers" in message


def test_hugging_face_source_passes_config_split_and_token(tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is unreachable from tests, so ``datasets.load_dataset`` is replaced by a recorder that
    returns real records; everything after loading runs for real."""
    calls: list[dict[str, Any]] = []
    records = read_jsonl(SAMPLES / "memorise.jsonl")

    def fake_load_dataset(path: str, name: str | None = None, **kwargs: Any) -> datasets.Dataset:
        calls.append({"path": path, "name": name, **kwargs})
        if path == "acme/missing":
            raise FileNotFoundError("Dataset 'acme/missing' doesn't exist on the Hub or cannot be accessed.")
        return datasets.Dataset.from_list(records[:12] if kwargs["split"] == "train" else records[12:])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_value")
    config = make_config("acme/stories", tmp_path, config="small", eval={"source": "acme/stories", "split": "test"})
    data = prepare_data(config, tokenizer)
    assert (data.num_train_records, data.num_eval_records) == (12, 4)
    assert [(c["path"], c["name"], c["split"], c["token"]) for c in calls] == [
        ("acme/stories", "small", "train", "hf_test_token_value"),
        ("acme/stories", "small", "test", "hf_test_token_value"),
    ]
    message = expect_data_error(make_config("acme/missing", tmp_path), tokenizer)
    assert "Hugging Face dataset 'acme/missing'" in message
    assert "tokenSecretRef" in message


def test_tokenized_records_are_cached_in_the_work_dir(tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second process (another local rank, a restarted container) loads the first one's result."""
    records = read_jsonl(SAMPLES / "memorise.jsonl")
    path = write_records(records[:12], tmp_path / "memorise.jsonl")
    first = prepare_data(make_config(path, tmp_path, eval={"ratio": 0.25}), tokenizer)
    assert len(list((tmp_path / "work" / "data-cache").glob("tokenized-*.npz"))) == 1

    def no_tokenizing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized again although the cache holds the result")

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "tokenize_records", no_tokenizing)
        second = prepare_data(make_config(path, tmp_path, eval={"ratio": 0.25}), tokenizer)
    assert targets_per_record(second, tokenizer) == targets_per_record(first, tokenizer)
    assert (second.num_train_records, second.num_eval_records) == (9, 3)

    # A changed file is a different dataset.
    write_records(records, path)
    third = prepare_data(make_config(path, tmp_path, eval={"ratio": 0.25}), tokenizer)
    assert (third.num_train_records, third.num_eval_records) == (12, 4)


def test_records_without_targets_are_dropped_and_all_dropped_is_an_error(tmp_path: Path, tokenizer: Any) -> None:
    long_prompt = " ".join(r["text"] for r in read_jsonl(SAMPLES / "memorise.jsonl"))
    path = write_records([{"prompt": long_prompt, "response": "Yes."}, {"prompt": "Short?", "response": "Yes."}], tmp_path / "p.jsonl")
    data = prepare_data(make_config(path, tmp_path, format="instruction", maxSeqLength=64), tokenizer)
    assert (data.num_train_records, data.dropped_records, data.truncated_records) == (1, 1, 1)
    only_long = write_records([{"prompt": long_prompt, "response": "Yes."}], tmp_path / "long.jsonl")
    message = expect_data_error(make_config(only_long, tmp_path, format="instruction", maxSeqLength=64), tokenizer)
    assert "every record" in message and "maxSeqLength=64" in message
