"""Data-parallel process layout: N processes per pod, M pods, one process group.

The layout is the runtime config's (``nodes``, ``processes_per_node``, ``rendezvous_host`` and
``rendezvous_port``); a pod's node rank is its completion index in the Indexed Job. With more than
one process in total the pod's main process starts the workers through torch's elastic launcher
(what torchrun uses) and waits; otherwise the recipe runs in the main process. Workers join a gloo
(CPU) or nccl (GPU) process group whose collectives time out after ``collective_timeout_seconds``.

One pod uses a static rendezvous. Several pods meet in a c10d rendezvous hosted by the pod of rank 0
(no etcd): pods started at different times wait up to ``join_timeout_seconds`` for each other, and
each pod names itself by its stable DNS name, so the ranks follow the completion indexes (up to ten
pods; beyond, by the names' order). Gang restarts are shared between torch and the Job controller:
when a rank fails, the pods still alive restart their workers in place (torch elastic, at most
``max_restarts`` times, the job's backoffLimit) and wait at a new round of the rendezvous, while the
Job controller replaces the failed pod, which torch cannot do; every rank then resumes from the
newest complete checkpoint, which rank 0 finds in S3. A pod whose peers never arrive stops after the
join timeout with ``RendezvousTimeout`` and the ranks whose pods have no address (not running).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from kubetune_api.exitcodes import ExitCode
from kubetune_api.runtime import RuntimeConfig
from kubetune_trainer.environment import ProcessEnvironment
from kubetune_trainer.errors import TrainerError

CONTROL_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Topology:
    """The process layout of the whole run as seen by one pod."""

    nodes: int
    node_rank: int
    processes_per_node: int
    rendezvous_host: str
    rendezvous_port: int
    peer_hosts: tuple[str, ...] = ()
    join_timeout_s: int = 600
    max_restarts: int = 0

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


def topology(runtime: RuntimeConfig, node_rank: int) -> Topology:
    """The layout of ``runtime`` for the pod with completion index ``node_rank``."""
    if not 0 <= node_rank < runtime.nodes:
        raise ValueError(f"node rank {node_rank} is outside {runtime.nodes} nodes")
    return Topology(
        nodes=runtime.nodes,
        node_rank=node_rank,
        processes_per_node=runtime.processes_per_node,
        rendezvous_host=runtime.rendezvous_host,
        rendezvous_port=runtime.rendezvous_port,
        peer_hosts=tuple(runtime.peer_hosts),
        join_timeout_s=runtime.join_timeout_seconds,
        max_restarts=runtime.max_restarts,
    )


def is_worker(process: ProcessEnvironment | None = None) -> bool:
    """True in a process the elastic launcher started, which must train rather than launch again."""
    return (process or ProcessEnvironment()).launched


class RendezvousTimeout(TrainerError):
    exit_code = ExitCode.RENDEZVOUS_TIMEOUT


def rendezvous_settings(topo: Topology) -> dict[str, Any]:
    """The launcher's rendezvous for ``topo``: static within one pod, c10d hosted by rank 0 across pods."""
    endpoint = f"{topo.rendezvous_host}:{topo.rendezvous_port}"
    if topo.nodes == 1:
        # One pod restarts as a whole: the Job controller runs it again and it resumes from S3.
        return {"rdzv_backend": "static", "rdzv_endpoint": endpoint, "rdzv_configs": {"rank": 0, "timeout": topo.join_timeout_s}, "max_restarts": 0}
    return {
        "rdzv_backend": "c10d",
        "rdzv_endpoint": endpoint,
        "rdzv_configs": {"is_host": topo.node_rank == 0, "join_timeout": topo.join_timeout_s, "read_timeout": topo.join_timeout_s},
        "max_restarts": topo.max_restarts,
        # Ranks are given in the order of the nodes' names, which the other pods resolve to reach rank 0's workers.
        "local_addr": topo.peer_hosts[topo.node_rank] if topo.peer_hosts else None,
    }


def missing_ranks(topo: Topology, resolve: Callable[[str], object] = socket.gethostbyname) -> list[int]:
    """Node ranks whose pod has no address under the headless Service: not running, so it cannot have joined."""
    missing = []
    for rank, host in enumerate(topo.peer_hosts):
        try:
            resolve(host)
        except OSError:
            missing.append(rank)
    return missing


def rendezvous_timeout(topo: Topology, resolve: Callable[[str], object] = socket.gethostbyname) -> RendezvousTimeout:
    """The failure of a rendezvous that did not form, naming the ranks that were not there."""
    missing = missing_ranks(topo, resolve)
    waited = f"within spec.distributed.joinTimeoutSeconds={topo.join_timeout_s}"
    if missing:
        named = ", ".join(f"node rank {rank} (pod {topo.peer_hosts[rank].split('.')[0]})" for rank in missing)
        return RendezvousTimeout(
            f"{named} did not join the rendezvous {waited}: its pod never started (no address). Look for a Pending trainer pod "
            "(a cordoned or full node, a missing GPU) with kubectl describe pod, free a node or raise the timeout, then create the job again."
        )
    return RendezvousTimeout(
        f"every pod of the {topo.nodes} nodes has an address, but they did not all join the rendezvous {waited}; "
        f"check that the pods reach {topo.rendezvous_host}:{topo.rendezvous_port} (NetworkPolicies) and their logs"
    )


def wait_for_rendezvous_host(topo: Topology, connect: Callable[[tuple[str, int]], object] = socket.create_connection, pause_s: float = 1.0) -> None:
    """A pod of rank > 0 waits (up to the join timeout) until rank 0's store accepts connections, so that a rank 0 that never
    starts fails the run by name rather than as a lost connection, which is what a store lost mid-run is (and retried)."""
    if topo.node_rank == 0 or topo.nodes == 1:
        return
    deadline = time.monotonic() + topo.join_timeout_s
    while True:
        try:
            connection = connect((topo.rendezvous_host, topo.rendezvous_port))
        except OSError:
            if time.monotonic() >= deadline:
                raise rendezvous_timeout(topo) from None
            time.sleep(pause_s)
            continue
        close = getattr(connection, "close", None)
        if close is not None:
            close()
        return


def launch(topo: Topology, entrypoint: Callable[..., Any], *args: Any) -> int:
    """Run ``entrypoint(*args)`` in every local worker; the exit code of the first failure, or 0.

    Raises ``RendezvousTimeout`` when the pods did not all meet in time."""
    config = LaunchConfig(
        min_nodes=topo.nodes,
        max_nodes=topo.nodes,
        nproc_per_node=topo.processes_per_node,
        run_id="kubetune",
        **rendezvous_settings(topo),
        monitor_interval=0.5,
        start_method="spawn",
        # Workers get SIGTERM from the launcher and need the grace period to upload a checkpoint;
        # the kubelet's SIGKILL at the end of terminationGracePeriodSeconds is the real bound.
        shutdown_timeout=3600,
    )
    wait_for_rendezvous_host(topo)
    if topo.nodes > 1:
        # The workers' store is published anew in each round of the rendezvous. Shared with the rendezvous (torch's
        # default), a pod that is rank 0 again after a restart reuses the first round's and never publishes it, and a
        # replacement pod then waits for it forever.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as error:
        _, first = error.get_first_failure()
        code = first.exitcode
        # A worker killed by a signal reports -signum; that is a runtime fault, retried.
        return code if code > 0 else int(ExitCode.RUNTIME_ERROR)
    except SignalException as error:
        return int(ExitCode.INTERRUPTED) if error.sigval == signal.SIGTERM else int(ExitCode.RUNTIME_ERROR)
    except RendezvousTimeoutError as error:
        # Rank 0's store stayed up and the others did not all come: not retried. A lost store (rank 0's pod died, or never
        # started) is a RendezvousConnectionError, a runtime fault the Job controller retries.
        raise rendezvous_timeout(topo) from error
    return 0


@dataclass(frozen=True)
class Context:
    """This process's place in the run."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    device: torch.device
    control_group: Any = None
    """A gloo group for small host-side decisions (stop flags), so they never wait on the GPU stream."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(use_cuda: bool, node_rank: int = 0, process: ProcessEnvironment | None = None, collective_timeout_s: int = 600) -> Context:
    """Join the process group (when launched) and pick this process's device.

    ``node_rank`` is the pod's completion index; a launched worker has the launcher's group rank instead.
    """
    process = process or ProcessEnvironment()
    rank = process.rank
    local_rank = process.local_rank or 0
    world_size = process.world_size if process.launched else 1
    local_world_size = process.local_world_size
    node_rank = process.group_rank if process.launched else node_rank
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    control_group = None
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None, timeout=timedelta(seconds=collective_timeout_s)
            )
        # Long timeout: other ranks wait here while rank 0 uploads a (possibly merged, full-size) model.
        control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Context(rank, local_rank, world_size, local_world_size, node_rank, device, control_group)


def all_reduce_sum(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_true(flag: bool, ctx: Context) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if not ctx.distributed:
        return flag
    # A CPU tensor on the gloo control group: checked every step without syncing the GPU.
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return bool(value.item() > 0)


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """``obj`` from every rank, in rank order (on every rank)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: Context) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    """Wait for every rank, on the host-side control group."""
    if ctx.distributed:
        dist.barrier(group=ctx.control_group)


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
