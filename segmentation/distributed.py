"""Process-group set-up from the launcher's environment, and small collective helpers.

The rank and world size come from the environment, as torchrun and SLURM's srun set it (see
``launch_env``).
Every helper is a no-op (or the identity) when no process group is initialised, so the same
code runs with and without a launcher.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist

from .errors import RunError, UsageError
from .launch_env import DistEnv

# How long a process waits for the others in a collective before it gives up (a hung or dead
# rank), unless ``init_distributed`` is given another timeout.
DEFAULT_TIMEOUT_SECONDS = 300.0


class CollectiveError(RunError, RuntimeError):
    """A collective failed: another process hung past the timeout, died or closed its connection."""


BACKENDS = ("auto", "nccl", "gloo")
# What a collective's error says when a peer's connection ended (the peer's process died or was killed).
LOST_CONNECTION = ("Connection closed", "Connection reset")


def gpu_index(local_rank: int, gpu_count: int, backend: str) -> int:
    """The GPU of the process with ``local_rank`` on a node with ``gpu_count`` GPUs: its own one,
    or, with the gloo backend, one shared round-robin when there are more processes than GPUs
    (NCCL refuses two processes on one GPU)."""
    if local_rank < gpu_count:
        return local_rank
    if backend == "gloo":
        return local_rank % gpu_count
    raise UsageError(
        f"the process of local rank {local_rank} has no GPU of its own: this node has {gpu_count}; start at "
        f"most {gpu_count} processes per node (torchrun --nproc_per_node {gpu_count}, or the Slurm job's tasks "
        "per node), or pass --dist_backend gloo to let processes share GPUs (slower; for tests)")


def backend_name(backend: str, device_type: str) -> str:
    """``--dist_backend`` resolved: "auto" is NCCL on CUDA, gloo otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown process-group backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    return backend


_timeout_seconds = DEFAULT_TIMEOUT_SECONDS


def init_distributed(env: DistEnv, device_type: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
                     backend: str = "auto") -> None:
    """Join the process group (``backend_name``: NCCL for cuda, gloo otherwise, unless ``backend``
    says which); nothing to do for one process.

    A collective that waits more than ``timeout_seconds`` for another process fails (with NCCL
    its watchdog ends the process) instead of hanging until the cluster's time limit.
    """
    global _timeout_seconds
    _timeout_seconds = timeout_seconds
    if env.world_size == 1:
        return
    # Imported once a process group exists, torch.distributed.fsdp (which torch._dynamo imports, and
    # with it the optimizer) keeps a reference to that group: destroy_process_group then leaves gloo's
    # threads running into the interpreter's shutdown, where they can abort a process that has
    # finished ("terminate called without an active exception"). Imported before, it keeps none.
    import torch.distributed.fsdp  # noqa: F401

    timeout = datetime.timedelta(seconds=timeout_seconds)
    store, _, _ = next(dist.rendezvous(
        f"tcp://{env.master_addr}:{env.master_port}", env.rank, env.world_size, timeout=timeout))
    # torchrun keeps its store across elastic restarts: without a prefix per attempt, a restarted
    # worker can read the address that a dead worker of the previous attempt published there.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend=backend_name(backend, device_type),
        store=dist.PrefixStore(f"attempt_{attempt}/", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` comes from the process group (a timeout, a dead or disconnected peer)."""
    if isinstance(error, CollectiveError) or isinstance(error, getattr(dist, "DistError", ())):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in message for marker in ("Timed out", "timed out", *LOST_CONNECTION)
    )


@contextlib.contextmanager
def waiting_for(what: str) -> Iterator[None]:
    """Turn a failed collective inside the block into a ``CollectiveError`` that says ``what``
    this process waited for."""
    try:
        yield
    except RuntimeError as error:
        if not is_initialized() or isinstance(error, CollectiveError) or not is_communication_error(error):
            raise
        if any(marker in str(error) for marker in LOST_CONNECTION):
            cause = f"lost the connection to another process at {what}: it died or was killed"
        else:
            cause = (f"gave up waiting for the other processes at {what} (timeout {_timeout_seconds:g} s): "
                     f"another process hung or died")
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: {cause}; see its log. "
            f"Rerun the same command to resume from the last checkpoint ({error})"
        ) from error


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier(what: str = "a barrier") -> None:
    if is_initialized():
        with waiting_for(what):
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, what: str = "a sum over processes") -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if is_initialized():
        with waiting_for(what):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, what: str = "a maximum over processes") -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all processes, in place; returns it."""
    if is_initialized():
        with waiting_for(what):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: Any, src: int = 0, what: str = "a broadcast") -> Any:
    """Rank ``src``'s ``obj`` on every process (must be picklable)."""
    if not is_initialized():
        return obj
    holder = [obj]
    with waiting_for(what):
        dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any, what: str = "a gather over processes") -> List[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not is_initialized():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    with waiting_for(what):
        dist.all_gather_object(gathered, obj)
    return gathered


def describe_placement(processes: Sequence[Tuple[str, int, str]]) -> str:
    """Where the processes run, by host: ``processes[r]`` is rank r's (host name, local rank, device)."""
    by_host: Dict[str, List[str]] = {}
    for rank_, (host, local_rank, device) in enumerate(processes):
        by_host.setdefault(host, []).append(f"rank {rank_} (local rank {local_rank}, {device})")
    return "; ".join(f"{host}: {', '.join(ranks)}" for host, ranks in by_host.items())


def placement(local_rank: int, device: torch.device) -> str:
    """``describe_placement`` of every process of the group (a collective: every rank calls it)."""
    here = (socket.gethostname(), local_rank, str(device))
    return describe_placement(all_gather_object(here, what="the gather of the processes' host names"))


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_initialized():
        dist.destroy_process_group()
