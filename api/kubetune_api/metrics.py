"""The trainer's Prometheus series, by the names Prometheus shows (counters end in _total, histograms by base name).

Base units, prefix ``kubetune_trainer_``; every series carries the ``namespace``, ``finetunejob`` and ``rank``
labels, GPU series add ``gpu``. The trainer exports them, the operator reads progress from them, and the
chart's dashboards and alerts query them.
"""

from __future__ import annotations

from enum import StrEnum

PREFIX = "kubetune_trainer_"
LABEL_NAMESPACE = "namespace"
LABEL_FINETUNEJOB = "finetunejob"
LABEL_RANK = "rank"
LABEL_GPU = "gpu"


class TrainerMetric(StrEnum):
    STEP = "kubetune_trainer_step"
    TOTAL_STEPS = "kubetune_trainer_total_steps"
    EPOCH = "kubetune_trainer_epoch"
    PROGRESS = "kubetune_trainer_progress_ratio"
    LOSS = "kubetune_trainer_loss"
    EVAL_LOSS = "kubetune_trainer_eval_loss"
    BASE_EVAL_LOSS = "kubetune_trainer_base_eval_loss"
    DIVERGED = "kubetune_trainer_diverged"
    LEARNING_RATE = "kubetune_trainer_learning_rate"
    TOKENS_PER_SECOND = "kubetune_trainer_tokens_per_second"
    ETA = "kubetune_trainer_eta_seconds"
    LAST_CHECKPOINT_STEP = "kubetune_trainer_last_checkpoint_step"
    TOKENS = "kubetune_trainer_tokens_total"
    S3_RETRIES = "kubetune_trainer_s3_retries_total"
    S3_BYTES = "kubetune_trainer_s3_bytes_total"
    CHECKPOINT_SAVE_SECONDS = "kubetune_trainer_checkpoint_save_seconds"
    CHECKPOINT_UPLOAD_SECONDS = "kubetune_trainer_checkpoint_upload_seconds"
    OOM_ADJUSTMENTS = "kubetune_trainer_oom_adjustments_total"
    MICRO_BATCH = "kubetune_trainer_micro_batch_size"
    INFO = "kubetune_trainer_info"
    RESIDENT_MEMORY = "kubetune_trainer_resident_memory_bytes"
    GPU_MEMORY_ALLOCATED = "kubetune_trainer_gpu_memory_allocated_bytes"
    GPU_MEMORY_RESERVED = "kubetune_trainer_gpu_memory_reserved_bytes"
    GPU_MEMORY_PEAK = "kubetune_trainer_gpu_memory_peak_bytes"
    GPU_MEMORY_TOTAL = "kubetune_trainer_gpu_memory_total_bytes"
    GPU_MEMORY_USED = "kubetune_trainer_gpu_memory_used_bytes"
    GPU_UTILIZATION = "kubetune_trainer_gpu_utilization_ratio"


GPU_METRICS = frozenset(m for m in TrainerMetric if m.startswith(f"{PREFIX}gpu_"))
"""Series a trainer exports only when it has GPUs."""
