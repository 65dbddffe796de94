"""The trainer's data pipeline: dataset source -> records -> token ids -> packed, sharded batches.

Public API (everything the training loop needs; ``prepare``, with the types of ``batches``)::

    data = prepare_data(config, tokenizer, rank=rank, world_size=world_size, store_factory=factory, environment=env)
    data.num_train_records, data.num_eval_records, data.truncated_records, data.dropped_records
    data.train / data.eval              # Sequence of examples (input_ids, labels, position_ids arrays)
    data.collate(examples)              # -> dict[str, torch.Tensor], ready for model(**inputs)
    data.steps_per_epoch(per_device_batch_size, grad_accum)
    stream = data.train_batches(per_device_batch_size, state=saved_state_or_None)
    batch = next(stream)                # Batch(inputs, num_tokens, num_target_tokens); endless
    stream.epoch_progress               # fractional epochs done, for metrics
    stream.state_dict()                 # save with every checkpoint; pass back as ``state``
    for batch in data.eval_batches(per_device_batch_size): ...

Sources (``spec.dataset.source``, and ``spec.dataset.eval.source``, told apart by
``kubetune_trainer.locations``): a local file or folder, an ``s3://bucket/key`` object or
``s3://bucket/prefix/`` (downloaded under runtime.work_dir through the store from ``store_factory``),
or a Hugging Face dataset id (config, split; token from HF_TOKEN).
Formats jsonl/json/parquet/csv come from spec.dataset.fileFormat or the file extension.

Order of operations: load, shuffle with training.seed, keep maxSamples, hold out eval.ratio,
tokenize (text / instruction / chat, see ``formats``), truncate to maxSeqLength, pack (see
``packing``). Every rank gets the same examples: the first process of a pod tokenizes and caches
the result under runtime.work_dir (see ``cache``), the others load it. The batch stream then
gives each rank its own shard.

Packed batches carry ``position_ids`` and no ``attention_mask``: call the model with
``use_cache=False`` during training, because transformers only derives the per-record
(block-diagonal) mask from position_ids when no cache is passed. That holds for sdpa and eager
attention; flash attention needs ``prepare_data(..., padding_free=True)``, which joins each
batch into one row (see ``Collator``). Unpacked batches carry an ``attention_mask``.

Bad data raises ``DataError`` (``exit_code`` is ExitCode.DATA_ERROR) with a message that names
what to fix.

This package's own import loads nothing: its pure parts (``records``, ``packing``) stay usable
without torch and ``datasets``.
"""
