"""Process-group set-up from the launcher's environment, and small collective helpers.

The rank and world size come from the environment, as torchrun and SLURM's srun set it:
torchrun variables first (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then SLURM
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of the node list), else one process.
Every helper is a no-op (or the identity) when no process group is initialised, so the same
code runs with and without a launcher.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from itertools import product
from typing import Any, Iterator, List, Mapping, Optional

import torch
import torch.distributed as dist

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# SLURM jobs without MASTER_PORT get a port derived from the job id, so that two jobs sharing
# a node do not collide: SLURM_PORT_BASE + job_id % SLURM_PORT_RANGE.
SLURM_PORT_BASE = 15000
SLURM_PORT_RANGE = 20000
# How long a process waits for the others in a collective before it gives up (a hung or dead
# rank), unless ``init_distributed`` is given another timeout.
DEFAULT_TIMEOUT_SECONDS = 300.0


class CollectiveError(RuntimeError):
    """A collective failed: another process hung past the timeout, died or closed its connection."""


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand SLURM's compressed host list, e.g. ``node[01-03,07],gpu1`` -> node01 node02 ...

    Several bracket groups in one name (``rack[1-2]-n[3-4]``) expand to their product; zero
    padding of the range bounds is kept.
    """
    hosts: List[str] = []
    # Top-level commas separate host expressions; commas inside brackets separate ranges.
    for expression in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        parts = re.split(r"(\[[^\]]*\])", expression)
        choices = [_expand_brackets(part) if part.startswith("[") else [part] for part in parts]
        hosts.extend("".join(combination) for combination in product(*choices))
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _expand_brackets(group: str) -> List[str]:
    values: List[str] = []
    for item in group[1:-1].split(","):
        if "-" in item:
            start, end = item.split("-", 1)
            width = len(start)
            values.extend(str(number).zfill(width) for number in range(int(start), int(end) + 1))
        else:
            values.append(item)
    return values


def read_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Rank, world size and rendezvous address of this process (``environ`` defaults to os.environ)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        elif nodelist:
            master_addr = expand_nodelist(nodelist)[0]
        else:
            master_addr = DEFAULT_MASTER_ADDR
        if "MASTER_PORT" in env:
            master_port = int(env["MASTER_PORT"])
        elif "SLURM_JOB_ID" in env:
            master_port = SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_RANGE
        else:
            master_port = DEFAULT_MASTER_PORT
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master_addr,
            master_port=master_port,
        )
    return DistEnv(0, 1, 0, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT)


def local_device(env: DistEnv, device_type: str) -> torch.device:
    """The device this process computes on: ``cuda:<local_rank>`` or ``cpu``."""
    if device_type == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device(device_type)


_timeout_seconds = DEFAULT_TIMEOUT_SECONDS


def init_distributed(env: DistEnv, device_type: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Join the process group (NCCL for cuda, gloo otherwise); nothing to do for one process.

    A collective that waits more than ``timeout_seconds`` for another process fails (with NCCL
    its watchdog ends the process) instead of hanging until the cluster's time limit.
    """
    global _timeout_seconds
    _timeout_seconds = timeout_seconds
    if env.world_size == 1:
        return
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    store, _, _ = next(dist.rendezvous(
        f"tcp://{env.master_addr}:{env.master_port}", env.rank, env.world_size, timeout=timeout))
    # torchrun keeps its store across elastic restarts: without a prefix per attempt, a restarted
    # worker can read the address that a dead worker of the previous attempt published there.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo",
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
        marker in message for marker in ("Timed out", "timed out", "Connection closed", "Connection reset")
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
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: gave up waiting for the other processes at {what} "
            f"(timeout {_timeout_seconds:g} s): another process hung or died; see its log. "
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


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_initialized():
        dist.destroy_process_group()
