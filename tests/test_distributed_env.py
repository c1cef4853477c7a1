import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from segmentation import distributed
from segmentation.errors import UsageError
from segmentation.launch_env import DistEnv, expand_nodelist, read_env

from train_cli_worker import REPO_ROOT


def test_single_process_without_launcher():
    assert read_env({}) == DistEnv(0, 1, 0, "127.0.0.1", 29500)


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "1234"}
    assert read_env(env) == DistEnv(5, 8, 1, "10.0.0.2", 1234)


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "99",
           "SLURM_PROCID": "7", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_NODELIST": "n[1-4]"}
    assert read_env(env) == DistEnv(1, 2, 1, "a", 99)


def test_slurm_variables():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_JOB_ID": "123456",
           "SLURM_NODELIST": "gpu[07-09,12],login1", "SLURM_STEP_NODELIST": "gpu[08-09]"}
    env_read = read_env(env)
    # The step's node list is preferred over the job's.
    assert env_read == DistEnv(6, 8, 2, "gpu08", 15000 + 123456 % 20000)


def test_slurm_job_node_list_and_explicit_master():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
           "SLURM_NODELIST": "node[01-03,07]"}
    assert read_env(env).master_addr == "node01"
    assert read_env(env).master_port == 15007
    env.update(MASTER_ADDR="head", MASTER_PORT="4000")
    assert (read_env(env).master_addr, read_env(env).master_port) == ("head", 4000)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a1,b[8-10],c", ["a1", "b8", "b9", "b10", "c"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[3-4]", ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
        ("gpu-[5,1]x", ["gpu-5x", "gpu-1x"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_helpers_without_process_group():
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    tensor = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.0, 2.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(3) == [3]
    distributed.barrier()
    distributed.init_distributed(DistEnv(0, 1, 0, "127.0.0.1", 29500), "cpu")
    assert not distributed.is_initialized()
    distributed.cleanup()


def test_placement_is_described_by_host_in_rank_order():
    processes = [("n1", 0, "cuda:0"), ("n1", 1, "cuda:1"), ("n2", 0, "cuda:0"), ("n2", 1, "cuda:1")]
    assert distributed.describe_placement(processes) == (
        "n1: rank 0 (local rank 0, cuda:0), rank 1 (local rank 1, cuda:1); "
        "n2: rank 2 (local rank 0, cuda:0), rank 3 (local rank 1, cuda:1)")
    assert distributed.placement(0, torch.device("cpu")) == f"{socket.gethostname()}: rank 0 (local rank 0, cpu)"


@pytest.mark.parametrize("failure, cause", [
    ("[pair.cc:545] Read error [10.0.0.2]:27353: Connection reset by peer",
     "rank 0 of 2: lost the connection to another process at the check after iteration 3: it died or was killed; "),
    ("Connection closed by peer [10.0.0.2]:5000",
     "rank 0 of 2: lost the connection to another process at the check after iteration 3: it died or was killed; "),
    ("Timed out waiting 5000ms for recv operation to complete",
     "rank 0 of 2: gave up waiting for the other processes at the check after iteration 3 (timeout 300 s): "
     "another process hung or died; "),
])
def test_a_failed_collective_says_whether_a_peer_died_or_hung(monkeypatch, failure, cause):
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "_timeout_seconds", 300.0)
    with pytest.raises(distributed.CollectiveError) as raised:
        with distributed.waiting_for("the check after iteration 3"):
            raise RuntimeError(failure)
    assert str(raised.value).startswith(cause) and str(raised.value).endswith(f"({failure})")


def test_each_process_gets_its_own_gpu_or_shares_one_through_gloo():
    assert [distributed.gpu_index(rank, 8, "auto") for rank in (0, 7)] == [0, 7]
    assert [distributed.gpu_index(rank, 1, "gloo") for rank in (0, 1, 2)] == [0, 0, 0]
    assert [distributed.gpu_index(rank, 2, "gloo") for rank in range(4)] == [0, 1, 0, 1]
    for backend in ("auto", "nccl"):
        with pytest.raises(UsageError, match="local rank 2 has no GPU of its own: this node has 2.*--dist_backend gloo"):
            distributed.gpu_index(2, 2, backend)
    assert distributed.backend_name("auto", "cuda") == "nccl"
    assert distributed.backend_name("auto", "cpu") == "gloo"
    assert distributed.backend_name("gloo", "cuda") == "gloo"


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from segmentation import distributed
    from segmentation.engine.sampler import EvalShardSampler
    from segmentation.launch_env import read_env

    env = read_env()
    distributed.init_distributed(env, "cpu")
    total = torch.tensor([float(env.rank + 1), 10.0])
    distributed.all_reduce_sum(total)
    message = distributed.broadcast_object({"from": distributed.rank()} if distributed.rank() == 0 else None)
    shard = list(EvalShardSampler(7, distributed.rank(), distributed.world_size()))
    shards = distributed.all_gather_object(shard)
    distributed.barrier()
    result = {"env": [env.rank, env.world_size, env.local_rank], "sum": total.tolist(), "message": message,
              "shards": shards, "initialized": distributed.is_initialized(), "main": distributed.is_main_process(),
              "placement": distributed.placement(env.local_rank, torch.device("cpu"))}
    import torch._dynamo  # as training does, through the optimizer, after the process group exists
    distributed.cleanup()
    # The threads left: the process group's must have ended with it, not at the interpreter's shutdown.
    result["threads"] = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.distributed
def test_torchrun_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                                  "LOCAL_RANK", "MASTER_"))}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path)],
        check=True, env=env, cwd=REPO_ROOT, timeout=240,
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(results):
        assert result["env"] == [r, 2, r]
        assert result["initialized"] and result["main"] == (r == 0)
        assert result["sum"] == [3.0, 20.0]
        assert result["message"] == {"from": 0}
        assert result["placement"] == f"{socket.gethostname()}: rank 0 (local rank 0, cpu), rank 1 (local rank 1, cpu)"
        shards = result["shards"]
        assert sorted(i for shard in shards for i in shard) == list(range(7))
        assert len(shards[0]) == 4 and len(shards[1]) == 3
        assert not [name for name in result["threads"] if "gloo" in name], result["threads"]
