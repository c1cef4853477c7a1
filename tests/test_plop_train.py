"""PLOP through train.py: both steps of synthetic 15-5, the thresholds' pass before step 1
(progress, a stop signal, SIGKILL: the rerun ends bit-identical), and 1 process equal to 2 in
float64 (the thresholds come from histograms summed over the processes)."""
import json
import re

import pytest
import torch

from conftest import FLOAT64_PLOP_GROUP, build_once, copy_run
from loss_traces import run_args, step_checkpoint
from train_cli_worker import (
    assert_states_equal, model_state, printed, run_checkpoints, run_logs, run_srun_like, run_train_forked,
    run_train_in_process, train_args,
)

EXIT_INTERRUPTED = 3
# 11 training images at step 1 with 2 per batch: 5 batches in the pass, 5 iterations per epoch.
PLOP_OPTIONS = ("--method", "PLOP", "--batch_size", "2", "--crop_size", "64")
PASS_BATCHES = 5


def plop_args(data_root, out, *extra):
    return train_args(data_root, out, *PLOP_OPTIONS, *extra)


@pytest.fixture(scope="session")
def plop_run(data_root, tmp_path_factory):
    """Both steps of PLOP on synthetic 15-5 in one process (shared, read-only), without in-step
    checkpoints (their interval does not change the weights)."""
    def build(folder):
        result = run_train_in_process(plop_args(data_root, folder, "--step", "all"))
        (folder / "output.txt").write_text(printed(result))

    return build_once(tmp_path_factory, "plop-run", build)


@pytest.mark.slow
def test_plop_trains_both_steps_with_its_pass_and_losses(plop_run):
    output = (plop_run / "output.txt").read_text()
    assert "PLOP preset filled in" in output
    assert f"step 1: PLOP's entropy thresholds (100 bins) over the {PASS_BATCHES} training batches of epoch 0" \
        in output
    assert "step 0: PLOP's" not in output  # step 0 is plain cross-entropy
    log = (run_logs(plop_run) / "train.log").read_text()
    assert re.search(r"epoch 1/1: loss [\d.]+, loss_cls [\d.]+, loss_pod [\d.]+", log)
    assert sorted(path.name for path in run_checkpoints(plop_run).iterdir()) == ["step0.pth", "step1.pth"]
    results = json.loads((run_logs(plop_run) / "step1.json").read_text())
    assert results["method"] == "PLOP" and results["options"]["label_protocol"] == "plop"
    assert 0.0 <= results["miou_all"] <= 1.0


@pytest.mark.slow
def test_stopped_and_killed_step_with_pass_ends_bit_identical(plop_run, data_root, tmp_path):
    out = copy_run(plop_run, tmp_path)
    (run_checkpoints(out) / "step1.pth").unlink()
    (run_logs(out) / "step1.json").unlink()
    args = plop_args(data_root, out, "--step", "1", "--ckpt_interval", "2")
    run_dir = run_checkpoints(out)

    # Runs 1-3 are forked copies of this process (run_train_forked): a process of its own each.
    # 1. SIGKILL in the pass: nothing of it was saved, the rerun starts it again.
    result = run_train_forked(args, check=False, env={"SEGMENTATION_FAULT": "kill:data-pass-batch:2"})
    assert result.returncode < 0 and not (run_dir / "step1-pass.pth").exists(), printed(result)

    # 2. A stop signal in the pass: its counts are saved, exit code 3.
    result = run_train_forked(args, check=False, env={"SEGMENTATION_FAULT": "term:data-pass-batch:3"})
    assert result.returncode == EXIT_INTERRUPTED, printed(result)
    assert "the pass over the training set before the training of step 1 stopped by a signal after batch 3" \
        in printed(result)
    assert torch.load(run_dir / "step1-pass.pth", weights_only=False)["batches"] == 3

    # 3. The rerun continues the pass at batch 4, then SIGKILL in training (in-step checkpoint at 2).
    result = run_train_forked(args, check=False, env={"SEGMENTATION_FAULT": "kill:train-iteration:3"})
    assert f"step 1: PLOP's entropy thresholds (100 bins) continues at batch 3 of {PASS_BATCHES}" in printed(result)
    assert (run_dir / "step1-iter2.pth").exists() and (run_dir / "step1-pass.pth").exists()

    # 4. The last rerun resumes training; the thresholds come from the in-step checkpoint.
    output = printed(run_train_in_process(args))
    assert "step 1: resumed from iteration 2" in output and "thresholds" not in output
    assert_states_equal(model_state(run_dir / "step1.pth"), model_state(run_checkpoints(plop_run) / "step1.pth"))
    assert sorted(path.name for path in run_dir.iterdir()) == ["step0.pth", "step1.pth"]


def _assert_close(one, two, key, rel=1e-9):
    assert one.dtype == two.dtype == torch.float64, key
    assert (one - two).abs().max().item() <= rel * one.abs().max().item() + 1e-300, key


@pytest.mark.slow
@pytest.mark.distributed
@FLOAT64_PLOP_GROUP
def test_one_process_equals_two_processes_in_float64(float64_plop_runs, data_root, tmp_path):
    # PLOP's float64 step 1 of the loss traces (tests/loss_traces.py: 32 px crops, so Local POD's grid is
    # 2x2 at most, 1 x 4 images) from their PLOP step 0 (plain cross-entropy, equal on 1 and 2
    # processes: test_train_distributed.py), against the same step on 2 x 2 images: 2 processes with
    # srun's variables, forked from this one (what they compute together is tested here; torchrun,
    # srun and their launches are in test_train_distributed.py).
    args = run_args("PLOP", data_root, tmp_path, step0_out=float64_plop_runs)
    args[args.index("--batch_size") + 1] = "2"
    outputs = run_srun_like(args, ntasks=2, fork=True)
    assert "2 process(es)" in outputs[0] and "PLOP's entropy thresholds" in outputs[0], outputs[0]
    one = model_state(step_checkpoint(float64_plop_runs, "PLOP"))
    two = model_state(step_checkpoint(tmp_path, "PLOP"))
    assert one.keys() == two.keys()
    for key, value in one.items():
        if value.is_floating_point():
            _assert_close(value, two[key], key)
        else:
            assert torch.equal(value, two[key]), key


@pytest.mark.slow
def test_a_checkpoint_of_the_original_code_starts_step_1(plop_run, data_root, tmp_path):
    # PLOP's own step-0 checkpoint layout: the DDP wrapper's "module." keys under "model_state",
    # no task or classes, In-Place ABN 1.0's buffers (no num_batches_tracked).
    ours = torch.load(run_checkpoints(plop_run) / "step0.pth", map_location="cpu", weights_only=False)["model_state"]
    original = tmp_path / "15-5-voc_PLOP_0.pth"
    torch.save({"model_state": {f"module.{key}": value for key, value in ours.items()
                                if not key.endswith("num_batches_tracked")}, "epoch": 30}, original)
    output = printed(run_train_in_process(plop_args(data_root, tmp_path, "--step", "1", "--step_ckpt", str(original))))
    assert "a checkpoint of the original MiB/PLOP code, converted" in output
    # The running statistics' counters only count: every weight and statistic equals the run from our step 0.
    step1 = model_state(run_checkpoints(tmp_path) / "step1.pth")
    reference = model_state(run_checkpoints(plop_run) / "step1.pth")
    assert_states_equal({key: value for key, value in step1.items() if not key.endswith("num_batches_tracked")},
                        {key: value for key, value in reference.items() if not key.endswith("num_batches_tracked")})
