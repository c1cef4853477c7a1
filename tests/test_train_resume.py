"""Interrupted runs resume exactly: SIGKILL mid-step, a stop signal (exit code 3), chained steps.
The interrupted runs are forked copies of the test's process (``run_until(..., fork=True)``: a
process of its own, with its own data-loader workers, but no new interpreter)."""
import re
import signal

import pytest
import torch

from conftest import mib_args
from train_cli_worker import (
    assert_states_equal, default_workers, every_process, model_state, run_train_in_process, run_until, train_args,
)

EXIT_INTERRUPTED = 3

pytestmark = pytest.mark.slow


def test_killed_and_stopped_chained_run_ends_bit_identical(mib_run, data_root, tmp_path):
    # With the default data-loader workers, unlike the shared run (which loads in the main process).
    out = tmp_path / "interrupted"
    args = default_workers(mib_args(data_root, out))
    run_dir = out / "checkpoints" / "synthetic-15-5" / "run"

    # 1. Mid-step 0, SIGUSR1 to every process, the data-loader workers included, as Slurm signals
    # a job step: an in-step checkpoint, exit code 3.
    code, output = run_until(args, lambda: any(run_dir.glob("step0-iter*.pth")), sig=signal.SIGUSR1,
                             targets=every_process, fork=True)
    assert code == EXIT_INTERRUPTED, output
    assert f"step 0: no in-step checkpoint in {run_dir}: training starts at iteration 0" in output
    stopped_at = int(re.search(r"step 0 stopped by a signal after iteration (\d+)", output).group(1))
    assert (run_dir / f"step0-iter{stopped_at}.pth").exists() and not (run_dir / "step0.pth").exists()

    # 2. The rerun resumes step 0 mid-epoch; SIGTERM to it once step 0 is done stops it in step 1.
    code, output = run_until(args, lambda: (run_dir / "step0.pth").exists(), sig=signal.SIGTERM, fork=True)
    assert f"step 0: resumed from iteration {stopped_at} (epoch 1 of 1)" in output
    assert code == EXIT_INTERRUPTED, output
    assert list(run_dir.glob("step1-iter*.pth")), "SIGTERM must leave an in-step checkpoint"
    assert not list(run_dir.glob("step0-iter*.pth")), "finished steps keep no in-step checkpoints"
    step0_mtime = (run_dir / "step0.pth").stat().st_mtime_ns

    # 3. The last rerun continues step 1 only (in this process: a process of its own adds nothing here).
    result = run_train_in_process(args)
    output = result.stdout + result.stderr
    assert "step 0 already finished" in output
    assert "step 1: resumed from iteration" in output
    assert (run_dir / "step0.pth").stat().st_mtime_ns == step0_mtime

    reference_dir = mib_run / "checkpoints" / "synthetic-15-5" / "run"
    for step in (0, 1):
        assert_states_equal(model_state(run_dir / f"step{step}.pth"),
                            model_state(reference_dir / f"step{step}.pth"))
    assert sorted(p.name for p in run_dir.iterdir()) == ["step0.pth", "step1.pth"]


def test_no_resume_starts_the_step_again(data_root, tmp_path):
    args = train_args(data_root, tmp_path, "--step", "0", "--ckpt_interval", "2", "--crop_size", "32")
    run_dir = tmp_path / "checkpoints" / "synthetic-15-5" / "run"
    run_until(args, lambda: any(run_dir.glob("step0-iter*.pth")), sig=signal.SIGKILL, fork=True)
    result = run_train_in_process([*args, "--no_resume"])
    assert "resumed" not in result.stdout + result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["step0.pth"]


def test_ewc_run_killed_mid_step_resumes_bit_identically_with_its_regularizer_state(estimating_step0, data_root,
                                                                                     tmp_path):
    # EWC's step 1 from the shared FT step 0 that estimated EWC's importance (conftest.py), once
    # uninterrupted, once killed and resumed.
    step0 = estimating_step0 / "checkpoints" / "synthetic-15-5" / "run" / "step0.pth"
    ewc = ("--method", "EWC", "--step", "1", "--step_ckpt", str(step0))
    reference = tmp_path / "reference"  # no in-step checkpoints: their interval does not change the weights
    run_train_in_process(train_args(data_root, reference, *ewc))
    reference_dir = reference / "checkpoints" / "synthetic-15-5" / "run"

    out = tmp_path / "interrupted"
    args = train_args(data_root, out, *ewc, "--ckpt_interval", "1")
    run_dir = out / "checkpoints" / "synthetic-15-5" / "run"
    run_until(args, lambda: any(run_dir.glob("step1-iter*.pth")), sig=signal.SIGKILL, fork=True)
    assert not (run_dir / "step1.pth").exists()
    in_step = torch.load(next(run_dir.glob("step1-iter*.pth")), map_location="cpu", weights_only=False)
    assert set(in_step["method_states"]) == {"ewc"}
    result = run_train_in_process(args)
    assert "step 1: resumed from iteration" in result.stdout + result.stderr

    resumed = torch.load(run_dir / "step1.pth", map_location="cpu", weights_only=False)
    expected = torch.load(reference_dir / "step1.pth", map_location="cpu", weights_only=False)
    assert_states_equal(resumed["model_state"], expected["model_state"])
    assert_states_equal(resumed["method_states"]["ewc"]["fisher"], expected["method_states"]["ewc"]["fisher"])
