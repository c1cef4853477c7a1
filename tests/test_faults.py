"""train.py under real faults (one process): SIGKILL at every point of a step, corrupt
checkpoints, a second launch, write errors, a diverging loss. Kills come from
``SEGMENTATION_FAULT`` (segmentation/faults.py), so each lands exactly where it is meant to; the
runs they end (and the one a file-size limit stops) are forked copies of the test's process
(``run_train_forked``: a process of its own, no new interpreter)."""
import json
import resource
import signal

import pytest
import torch

from conftest import copy_run, mib_args
from segmentation.engine.run_lock import RunLock
from train_cli_worker import (
    assert_states_equal, model_state, printed, run_checkpoints, run_logs, run_train_forked, run_train_in_process,
    train_args,
)

EXIT_FAILED = 1
SCORES = ("class_iou", "miou_all", "miou_old", "miou_new", "overall_acc", "mean_acc")


def _killed_at(args, point):
    # A process of its own, forked from this one: SIGKILL ends it wherever it is.
    result = run_train_forked(args, check=False, env={"SEGMENTATION_FAULT": f"kill:{point}"})
    assert result.returncode == -signal.SIGKILL, printed(result)
    return printed(result)


def _failed(args, in_process=True, **kwargs):
    result = run_train_in_process(args, check=False) if in_process else run_train_forked(args, check=False, **kwargs)
    output = printed(result)
    assert result.returncode == EXIT_FAILED, output
    assert "Traceback" not in output, output
    return output


@pytest.mark.slow
def test_sigkill_at_every_point_of_a_step_then_rerun_is_bit_identical(mib_run, data_root, tmp_path):
    args = mib_args(data_root, tmp_path)
    run_dir, log_dir = run_checkpoints(tmp_path), run_logs(tmp_path)

    # 1. During the validation at the end of step 0: the in-step checkpoints are the restart point.
    _killed_at(args, "validation")
    assert not (run_dir / "step0.pth").exists() and list(run_dir.glob("step0-iter*.pth"))

    # 2. While step0.pth is written: only its temporary file exists.
    _killed_at(args, "write:step0.pth")
    assert not (run_dir / "step0.pth").exists() and list(run_dir.glob(".step0.pth.*.tmp"))

    # 3. Between step0.pth and its results: the rerun removed the temporary file; the in-step
    #    checkpoints are still there when the process dies.
    _killed_at(args, "after-step-checkpoint")
    assert (run_dir / "step0.pth").exists() and list(run_dir.glob("step0-iter*.pth"))
    assert not list(run_dir.glob(".*.tmp")) and not (log_dir / "step0.json").exists()

    # 4. step0.pth is then damaged: the rerun sets it aside, rebuilds it from the latest in-step
    #    checkpoint and is killed while testing it: no results file from a half-run test.
    with open(run_dir / "step0.pth", "r+b") as handle:
        handle.truncate(1000)
    output = _killed_at(args, "test")
    assert "step 0 is trained again from its latest in-step checkpoint" in output
    assert (run_dir / "step0.pth.corrupt").exists() and not (log_dir / "step0.json").exists()

    # 5. During the validation of step 1.
    _killed_at(args, "validation")
    assert (log_dir / "step0.json").exists() and not (run_dir / "step1.pth").exists()

    run_train_in_process(args)
    for step in (0, 1):
        assert_states_equal(model_state(run_dir / f"step{step}.pth"),
                            model_state(run_checkpoints(mib_run) / f"step{step}.pth"))
        ours = json.loads((log_dir / f"step{step}.json").read_text())
        theirs = json.loads((run_logs(mib_run) / f"step{step}.json").read_text())
        assert {key: ours[key] for key in SCORES} == {key: theirs[key] for key in SCORES}
    assert sorted(p.name for p in run_dir.iterdir()) == ["step0.pth", "step0.pth.corrupt", "step1.pth"]
    assert not list(log_dir.glob(".*.tmp"))


def test_corrupt_step_checkpoint_without_in_step_checkpoints_stops_with_a_message(mib_run, data_root, tmp_path):
    out = copy_run(mib_run, tmp_path)
    broken = run_checkpoints(out) / "step0.pth"
    broken.write_bytes(b"\0" * 4096)
    (run_logs(out) / "step0.json").unlink()
    output = _failed(mib_args(data_root, out))
    assert f"error: cannot read checkpoint {broken}" in output
    assert "delete it (or restore it from a backup) and rerun the same command to train step 0 again" in output
    assert not (run_logs(out) / "step0.json").exists()


def test_corrupt_checkpoint_options_are_reported(data_root, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    step1 = mib_args(data_root, tmp_path / "out")
    step1[step1.index("--step") + 1] = "1"
    output = _failed([*step1, "--step_ckpt", str(garbage)])
    assert f"cannot read checkpoint {garbage}" in output and "pass another --step_ckpt" in output
    output = _failed([*step1, "--test", "--ckpt", str(garbage)])
    assert f"cannot read checkpoint {garbage}" in output and "pass another --ckpt" in output


def test_second_launch_of_a_running_run_is_refused(data_root, tmp_path):
    args = mib_args(data_root, tmp_path)
    with RunLock(run_checkpoints(tmp_path)):  # as a running launch holds it
        output = _failed(args)
    assert f"another run is writing to {run_checkpoints(tmp_path)}" in output and "choose another --name" in output
    assert not (run_checkpoints(tmp_path) / "step0.pth").exists()


def test_overwrite_by_a_second_launch_leaves_the_running_run_alone(mib_run, data_root, tmp_path):
    copy_run(mib_run, tmp_path)
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with RunLock(run_checkpoints(tmp_path)):  # as a running launch holds it
        output = _failed([*mib_args(data_root, tmp_path, "--weight_decay", "0.001"), "--overwrite"])
    assert f"another run is writing to {run_checkpoints(tmp_path)}" in output
    assert {path: path.read_bytes() for path in files} == files


def _file_size_limit(limit_bytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def test_write_error_stops_naming_the_file_and_leaves_no_temporary_file(data_root, tmp_path):
    # Files over 1 MB cannot be written (EFBIG, as a full disk gives ENOSPC): the first
    # in-step checkpoint fails.
    args = train_args(data_root, tmp_path, "--step", "0", "--ckpt_interval", "2")
    output = _failed(args, in_process=False, preexec_fn=_file_size_limit(2**20))
    path = run_checkpoints(tmp_path) / "step0-iter2.pth"
    assert f"error: cannot write {path}: File too large" in output
    # No temporary file is left: the failed launch removes the run folder it created.
    assert not run_checkpoints(tmp_path).exists()


def test_diverging_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    args = train_args(data_root, tmp_path, "--step", "0", "--ckpt_interval", "2", "--lr", "1e6",
                      "--print_interval", "10")
    output = _failed(args)
    assert "error: step 0: non-finite value (NaN or Inf) in the gradient at iteration 4" in output
    assert "the last in-step checkpoint (iteration 2) is kept" in output
    kept = sorted(p.name for p in run_checkpoints(tmp_path).iterdir())
    assert kept == ["step0-iter2.pth"]
    state = model_state(run_checkpoints(tmp_path) / kept[0])
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
