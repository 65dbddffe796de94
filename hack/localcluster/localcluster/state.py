"""The state file `up` writes and `down`/`status` read (JSON, in the workdir)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .process import ProcessRecord

STATE_VERSION = 1


@dataclass(frozen=True)
class ClusterState:
    api_url: str
    kubeconfig: Path
    ca_file: Path
    bin_dir: Path
    processes: tuple[ProcessRecord, ...]

    def to_json(self) -> str:
        document: dict[str, Any] = {
            "version": STATE_VERSION,
            "apiUrl": self.api_url,
            "kubeconfig": str(self.kubeconfig),
            "caFile": str(self.ca_file),
            "binDir": str(self.bin_dir),
            "processes": [{"name": p.name, "pid": p.pid, "startTicks": p.start_ticks, "log": str(p.log)} for p in self.processes],
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        document = json.loads(text)
        if document.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state file version {document.get('version')!r}")
        return cls(
            api_url=document["apiUrl"],
            kubeconfig=Path(document["kubeconfig"]),
            ca_file=Path(document["caFile"]),
            bin_dir=Path(document["binDir"]),
            processes=tuple(
                ProcessRecord(
                    name=p["name"],
                    pid=int(p["pid"]),
                    start_ticks=int(p["startTicks"]),
                    log=Path(p["log"]),
                )
                for p in document["processes"]
            ),
        )


def write_state(path: Path, state: ClusterState) -> None:
    # Write then rename, so a reader never sees half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.to_json())
    tmp.replace(path)


def read_state(path: Path) -> ClusterState | None:
    try:
        return ClusterState.from_json(path.read_text())
    except FileNotFoundError:
        return None
