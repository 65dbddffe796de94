"""The base model and its adapters: small pure translators from the spec, then loading.

Translators (``quantization_config``, ``lora_config``, ``resolve_precision``,
``resolve_target_modules``) take spec objects and return library objects or plain values. Loading
resolves where the model lives (``locations.location``: a local path, an ``s3://`` prefix downloaded
through the store, or a Hugging Face id + revision with HF_TOKEN) and applies them.
torch, transformers and peft are imported inside functions so that importing this module (and the
translators' unit tests) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api.output import OutputSpec
from kubetune_api.recipe import ALL_LINEAR, LoraSpec, ModelSpec, Precision, QuantizationSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.errors import ConfigError, ModelError
from kubetune_trainer.hub import load_error
from kubetune_trainer.locations import local_path, location
from kubetune_trainer.storage.paths import parse_s3_uri

if TYPE_CHECKING:
    import torch

    from kubetune_api.runtime import TrainerConfig
    from kubetune_trainer.storage.store import S3Store

OUTPUT_HEADS = frozenset({"lm_head", "embed_out", "output"})
"""Output projections that never get adapters (peft's all-linear rule excludes them too)."""


# ---- pure translators -----------------------------------------------------------------------


def quantization_config(spec: QuantizationSpec | None, *, sharded: bool = False) -> Any:
    """BitsAndBytesConfig for QLoRA, or None for plain LoRA.

    ``sharded`` (FSDP): the packed 4-bit weights are stored in the compute dtype, so shards of quantized and plain
    weights share one dtype (peft's and bitsandbytes' recipe for QLoRA with FSDP)."""
    if spec is None:
        return None
    from transformers import BitsAndBytesConfig as _BitsAndBytesConfig

    BitsAndBytesConfig: Any = _BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.type.value,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=dtype_from_name(spec.compute_dtype.value),
        # Keeps norms and the head in the compute dtype instead of upcasting them (saves memory).
        bnb_4bit_quant_storage=dtype_from_name(spec.compute_dtype.value if sharded else "uint8"),
    )


def dtype_from_name(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def resolve_precision(precision: Precision, *, cuda: bool, bf16_supported: bool) -> Precision:
    """The concrete precision: ``auto`` is bf16 on capable GPUs, fp16 on older ones, fp32 on CPU."""
    if not cuda:
        # Half precision matmuls on CPU are slow and fp16 needs loss scaling: CPU runs are fp32.
        return Precision.FP32
    if precision is Precision.AUTO:
        return Precision.BF16 if bf16_supported else Precision.FP16
    return precision


def precision_dtype_name(precision: Precision) -> str:
    """torch dtype name of a concrete precision."""
    return {Precision.BF16: "bfloat16", Precision.FP16: "float16", Precision.FP32: "float32"}[precision]


def resolve_target_modules(requested: list[str], linear_names: list[str]) -> list[str]:
    """Module name suffixes that get adapters; unknown names fail with the model's linear layers."""
    available = sorted(set(linear_names))
    if ALL_LINEAR in requested:
        if len(requested) > 1:
            raise ModelError(
                f"spec.lora.targetModules: '{ALL_LINEAR}' cannot be combined with other names; use it alone or list names from: {', '.join(available)}"
            )
        if not available:
            raise ModelError("spec.lora.targetModules: the model has no linear layers besides the output head, so LoRA has nothing to adapt.")
        return available
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ModelError(
            f"spec.lora.targetModules: {', '.join(repr(n) for n in unknown)} not found in the model. "
            f"Its linear layers are: {', '.join(available)} (or use '{ALL_LINEAR}')."
        )
    return list(dict.fromkeys(requested))


def lora_config(spec: LoraSpec, target_modules: list[str]) -> Any:
    """peft LoraConfig for a causal language model."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_modules,
        bias=spec.bias.value,
        use_rslora=spec.use_rslora,
    )


# ---- loading ----------------------------------------------------------------------------------


StoreFactory = Callable[[OutputSpec], "S3Store"]


@dataclass(frozen=True)
class ModelFiles:
    """Where from_pretrained reads the model and what to pass along with it."""

    path: str
    revision: str | None
    token: str | None
    cache_dir: str | None = None
    """Download cache of hub models (HF_HUB_CACHE, set when the model cache volume is mounted); None uses HF_HOME's."""
    resolved: str | None = None
    """What the files are exactly: the S3 objects' content digest, or a local model's config and index digest
    (a hub model's commit is known once loaded: config._commit_hash)."""


def fetch_model(
    spec: ModelSpec,
    output: OutputSpec,
    work_dir: Path,
    store_factory: StoreFactory,
    environment: TrainerEnvironment | None = None,
    cache_dir: Path | None = None,
) -> ModelFiles:
    """Make the model readable by from_pretrained: check a local path, download an s3:// prefix.

    With ``cache_dir`` (the model-cache volume) an s3:// model is read from there when its objects are
    unchanged, and downloaded there once otherwise (``model_cache``)."""
    from kubetune_trainer.model_cache import cached_s3_model, local_revision

    environment = environment or TrainerEnvironment()
    kind = location(spec.source)
    if kind == "local":
        path = local_path(spec.source)
        if not (path / "config.json").is_file():
            raise ModelError(
                f"spec.model.source: no model at {path} (config.json missing). Point it at a folder saved with "
                "save_pretrained, check the volume mount (cacheVolumeClaim), or use a Hugging Face id or s3:// prefix."
            )
        return ModelFiles(str(path), None, None, resolved=local_revision(path))
    if kind == "s3":
        bucket, prefix = parse_s3_uri(spec.source)
        store = store_factory(output.model_copy(update={"bucket": bucket}))
        if cache_dir is not None:
            target, digest = cached_s3_model(spec.source, store, prefix, cache_dir / "s3")
        else:
            target = work_dir / "models" / bucket / prefix.strip("/")
            store.download_prefix(prefix.rstrip("/"), target)
            digest = None
        if not (target / "config.json").is_file():
            raise ModelError(f"spec.model.source: {spec.source} holds no config.json. Upload a folder saved with save_pretrained to that prefix.")
        return ModelFiles(str(target), None, None, resolved=digest or local_revision(target))
    secret = spec.token_secret_ref
    if secret is not None and not (environment.hf_token or "").strip():
        # Without this the download runs anonymously and a gated model reads as "not found".
        raise ConfigError(f"spec.model.tokenSecretRef: Secret '{secret.name}' has an empty value for '{secret.key}'. Put the Hugging Face token there.")
    # The operator points HF_HUB_CACHE at the cache volume when there is one, and HF_HOME at scratch.
    return ModelFiles(spec.source, spec.revision, environment.hf_token or None, environment.hf_hub_cache or None)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
"""Files the preparation step never fetches: the weights (their index files, *.index.json, are kept)."""


def is_weight_file(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES)


def fetch_model_metadata(spec: ModelSpec, output: OutputSpec, work_dir: Path, store_factory: StoreFactory, environment: TrainerEnvironment) -> Path:
    """A local folder with the model's config.json and tokenizer files, never its weights."""
    kind = location(spec.source)
    if kind == "local":
        return Path(fetch_model(spec, output, work_dir, store_factory, environment).path)
    target = work_dir / "model-metadata"
    if kind == "s3":
        bucket, prefix = parse_s3_uri(spec.source)
        store = store_factory(output.model_copy(update={"bucket": bucket}))
        root = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        for key in store.list_keys(root):
            name = key[len(root) :]
            if name and not is_weight_file(name):
                store.download_file(key, target / name)
    else:
        _hub_metadata(spec, target, environment)
    if not (target / "config.json").is_file():
        raise ModelError(f"spec.model.source: {spec.source} holds no config.json. Point it at a model saved with save_pretrained.")
    return target


def _hub_metadata(spec: ModelSpec, target: Path, environment: TrainerEnvironment) -> None:
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import HfHubHTTPError

    token = environment.hf_token or None
    try:
        names = list_repo_files(spec.source, revision=spec.revision, token=token)
        for name in names:
            if not is_weight_file(name) and "/" not in name:
                hf_hub_download(spec.source, name, revision=spec.revision, token=token, local_dir=target, cache_dir=environment.hf_hub_cache)
    except (HfHubHTTPError, OSError, ValueError) as error:
        hint = _hint(ModelFiles(spec.source, spec.revision, token))
        raise load_error(f"{spec.source!r} from the Hugging Face hub", error, hint) from error


def load_tokenizer(files: ModelFiles, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            files.path, revision=files.revision, token=files.token, cache_dir=files.cache_dir, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise load_error(f"the tokenizer of {files.path!r}", error, _hint(files)) from error
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    files: ModelFiles, *, dtype_name: str, quantization: QuantizationSpec | None, device: str, trust_remote_code: bool, sharded: bool = False
) -> Any:
    """The frozen base model on ``device``, quantized for QLoRA."""
    from transformers import AutoModelForCausalLM as _Auto

    auto: Any = _Auto
    kwargs: dict[str, Any] = {
        "revision": files.revision,
        "token": files.token,
        "cache_dir": files.cache_dir,
        "trust_remote_code": trust_remote_code,
        "dtype": dtype_from_name(dtype_name),
    }
    quant = quantization_config(quantization, sharded=sharded)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    try:
        model = auto.from_pretrained(files.path, **kwargs)
    except (OSError, ValueError) as error:
        raise load_error(repr(files.path), error, _hint(files)) from error
    if quant is None:
        model.to(device)
    # The KV cache is useless in training and conflicts with gradient checkpointing.
    model.config.use_cache = False
    return model


def linear_layer_names(model: Any) -> list[str]:
    """Distinct leaf names of the linear layers (plain or bitsandbytes-quantized), output head excluded."""
    import torch

    names: set[str] = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}
        if is_linear and leaf not in OUTPUT_HEADS:
            names.add(leaf)
    return sorted(names)


def apply_lora(model: Any, spec: LoraSpec, *, gradient_checkpointing: bool) -> Any:
    """Wrap ``model`` with trainable LoRA adapters (peft); a bitsandbytes-quantized base is handled the same way.

    peft's ``prepare_model_for_kbit_training`` would also cast every non-quantized weight (embeddings,
    output head, norms) to fp32: 2 GiB more for an 8B model with a 128k vocabulary, and fp32 activations
    behind the norms. The base stays in its load dtype instead (bitsandbytes computes in compute_dtype);
    only the adapters train.
    """
    from peft import get_peft_model

    targets = resolve_target_modules(list(spec.target_modules), linear_layer_names(model))
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # Frozen embeddings give inputs without grad; checkpointed blocks need one to backpropagate.
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(spec, targets))


def _hint(files: ModelFiles) -> str:
    if location(files.path) == "hub":
        return "Check the model id and spec.model.revision; gated or private models need spec.model.tokenSecretRef."
    return "The folder must hold a model saved with save_pretrained (config.json, weights, tokenizer files)."


def load_for_training(config: TrainerConfig, files: ModelFiles, device: torch.device, *, sharded: bool) -> tuple[Any, Precision]:
    """The base model with fresh adapters on ``device``, and the precision it trains in there."""
    import torch

    cuda = device.type == "cuda"
    precision = resolve_precision(config.training.precision, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
    quant = config.effective_quantization()
    base = load_base_model(
        files,
        dtype_name=quant.compute_dtype.value if quant is not None else precision_dtype_name(precision),
        quantization=quant,
        device=str(device),
        trust_remote_code=config.model.trust_remote_code,
        sharded=sharded,
    )
    return apply_lora(base, config.lora, gradient_checkpointing=config.training.gradient_checkpointing), precision
