"""Faults under torchrun (2 processes, gloo): a worker killed mid-step and restarted by the
elastic agent, and a hung rank that the others give up on."""
import time

import pytest

from conftest import two_process_args
from train_cli_worker import TORCHRUN, assert_states_equal, model_state, run_checkpoints, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _args(data_root, out, *extra):
    """Step 0 of the shared two-process run."""
    args = two_process_args(data_root, out, *extra)
    args[args.index("--step") + 1] = "0"
    return args


def test_elastic_restart_after_a_killed_worker_ends_with_the_same_weights(two_process_run, data_root, tmp_path):
    out = tmp_path / "elastic"
    launcher = [*TORCHRUN, "--nproc_per_node", "2", "--max-restarts", "1"]
    # Rank 1 dies with SIGKILL after iteration 5 (the in-step checkpoint of iteration 4 exists);
    # the agent restarts both workers once and they resume from it.
    result = run_train(_args(data_root, out), launcher=launcher,
                       env={"SEGMENTATION_FAULT": "kill:train-iteration:5@1"}, timeout=300)
    output = result.stdout + result.stderr
    assert "step 0: resumed from iteration 4" in output
    assert_states_equal(model_state(run_checkpoints(out) / "step0.pth"),
                        model_state(run_checkpoints(two_process_run) / "step0.pth"))
    assert sorted(p.name for p in run_checkpoints(out).iterdir()) == ["step0.pth"]


def test_hung_rank_makes_the_others_stop_within_the_timeout(data_root, tmp_path):
    start = time.monotonic()
    result = run_train(_args(data_root, tmp_path, "--collective_timeout", "5"), nproc=2, check=False,
                       env={"SEGMENTATION_FAULT": "hang:train-iteration:3@1"}, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "rank 0 of 2: gave up waiting for the other processes at" in output, output
    assert "(timeout 5 s)" in output
    assert time.monotonic() - start < 120
