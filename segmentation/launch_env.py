"""Where this process sits in a launch, read from the launcher's environment (no torch needed).

torchrun's variables first (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then
SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of the node list), else one
process. ``train.py`` reads it before importing torch, so that only the first process of a
launch reports a usage error.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from itertools import product
from typing import List, Mapping, Optional

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# SLURM jobs without MASTER_PORT get a port derived from the job id, so that two jobs sharing
# a node do not collide: SLURM_PORT_BASE + job_id % SLURM_PORT_RANGE.
SLURM_PORT_BASE = 15000
SLURM_PORT_RANGE = 20000


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


def launched_by_torchrun(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether torchrun started this process (it stops the others as soon as one exits)."""
    return "TORCHELASTIC_RUN_ID" in (os.environ if environ is None else environ)
