"""Activations saved for the backward pass kept in host memory instead of on the GPU.

With gradient checkpointing the tensors autograd keeps are mostly each decoder layer's input (the
residual stream, micro-batch x sequence x hidden in the compute dtype: 32 MiB a layer for an 8B
model at micro-batch 2 and 2,048 tokens, 1 GiB over 32 layers); without it, every intermediate.
``ActivationOffload`` is a pair of saved-tensor hooks: ``pack`` copies each saved activation to
pinned host memory on a side CUDA stream, so the copy overlaps the next layer's compute, and
``unpack`` brings it back when the backward pass asks for it. The GPU copy is released as soon as its
transfer is done (``record_stream`` tells the allocator to wait for the side stream, not for the
backward pass).

Parameters (frozen base weights, adapter weights) and small tensors stay where they are: copying
weights back and forth would cost bandwidth for nothing, and small tensors cost more in launch
overhead than they free. On a CPU the hooks run the same way with host-to-host copies, which keeps
the path testable (and frees nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

MIN_OFFLOAD_BYTES = 64 * 1024
"""Saved tensors smaller than this stay on the device."""


@dataclass
class OffloadStats:
    """What one forward pass moved off the device: ``kept_bytes`` stayed, ``offloaded_bytes`` went to the host."""

    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    kept_bytes: int = 0


@dataclass
class _Offloaded:
    host: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event | None = None


@dataclass
class ActivationOffload:
    """Saved-tensor hooks that keep activations in (pinned) host memory between forward and backward."""

    min_bytes: int = MIN_OFFLOAD_BYTES
    stats: OffloadStats = field(default_factory=OffloadStats)
    _stream: Any = None

    def pack(self, tensor: torch.Tensor) -> Any:
        size = tensor.numel() * tensor.element_size()
        if isinstance(tensor, torch.nn.Parameter) or size < self.min_bytes or tensor.layout is not torch.strided:
            self.stats.kept_bytes += size
            return tensor
        self.stats.offloaded_tensors += 1
        self.stats.offloaded_bytes += size
        if tensor.device.type != "cuda":
            return _Offloaded(tensor.detach().clone(memory_format=torch.preserve_format), tensor.device)
        stream = self._side_stream(tensor.device)
        # The side stream must see the tensor's producer finish before it copies.
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor.detach(), non_blocking=True)
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copied.record(stream)
        # The caching allocator may reuse the GPU block only once the side stream's copy is done.
        tensor.record_stream(stream)
        return _Offloaded(host, tensor.device, copied)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            restored: torch.Tensor = packed
            return restored
        if packed.copied is None:
            return packed.host
        current = torch.cuda.current_stream(packed.device)
        current.wait_event(packed.copied)
        return packed.host.to(packed.device, non_blocking=True)

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return self._stream

    @contextlib.contextmanager
    def __call__(self) -> Iterator[OffloadStats]:
        """Offload what the forward pass inside saves; yields this pass's statistics."""
        self.stats = OffloadStats()
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self.stats
