"""What a training process learns from inside its pod: torch's elastic launcher and the container runtime.

The operator's side of the environment is the contract's ``kubetune_api.runtime.TrainerEnvironment``.
These variables are set after the pod starts, by the launcher for each worker it spawns (torchrun's
names) and by the NVIDIA container runtime, so nothing outside the trainer needs to know them.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProcessEnvironment(BaseSettings):
    """This process's place among the launcher's workers, and the GPUs it may see."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    rank: int = Field(default=0, ge=0, description="RANK: global rank of a launched worker.")
    local_rank: int | None = Field(default=None, ge=0, description="LOCAL_RANK: rank within the pod; set only in launched workers.")
    world_size: int = Field(default=1, ge=1, description="WORLD_SIZE: processes in the whole run.")
    local_world_size: int = Field(default=1, ge=1, description="LOCAL_WORLD_SIZE: processes in this pod.")
    group_rank: int = Field(default=0, ge=0, description="GROUP_RANK: the node rank the launcher gave this pod.")
    cuda_visible_devices: str = Field(default="", description="CUDA_VISIBLE_DEVICES: physical GPUs behind CUDA's device indices.")

    @property
    def launched(self) -> bool:
        """True in a worker started by the elastic launcher."""
        return self.local_rank is not None
