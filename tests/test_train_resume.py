"""Interrupted runs resume exactly: SIGKILL mid-step, SIGTERM (exit code 3), chained steps."""
import signal

import pytest
import torch

from conftest import mib_args
from train_cli_worker import assert_states_equal, model_state, run_train_in_process, run_until, train_args

EXIT_INTERRUPTED = 3

pytestmark = pytest.mark.slow


def test_killed_and_stopped_chained_run_ends_bit_identical(mib_run, data_root, tmp_path):
    # With a data-loader worker, unlike the shared run (which loads in the main process).
    out = tmp_path / "interrupted"
    args = mib_args(data_root, out, "--num_workers", "1")
    run_dir = out / "checkpoints" / "synthetic-15-5" / "run"

    # 1. SIGKILL in the middle of step 0, once an in-step checkpoint exists.
    run_until(args, lambda: any(run_dir.glob("step0-iter*.pth")), sig=signal.SIGKILL)
    assert not (run_dir / "step0.pth").exists()

    # 2. The rerun resumes step 0 mid-epoch; SIGTERM once step 0 is done stops it in step 1.
    code, output = run_until(args, lambda: (run_dir / "step0.pth").exists(), sig=signal.SIGTERM)
    assert "step 0: resumed from iteration" in output
    assert code == EXIT_INTERRUPTED
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
    args = train_args(data_root, tmp_path, "--step", "0", "--ckpt_interval", "2")
    run_dir = tmp_path / "checkpoints" / "synthetic-15-5" / "run"
    run_until(args, lambda: any(run_dir.glob("step0-iter*.pth")), sig=signal.SIGKILL)
    result = run_train_in_process([*args, "--no_resume"])
    assert "resumed" not in result.stdout + result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["step0.pth"]


def test_ewc_run_killed_mid_step_resumes_bit_identically_with_its_regularizer_state(data_root, tmp_path):
    reference = tmp_path / "reference"
    ewc = ("--method", "EWC", "--ckpt_interval", "1")
    run_train_in_process(train_args(data_root, reference, "--step", "all", *ewc))
    reference_dir = reference / "checkpoints" / "synthetic-15-5" / "run"

    out = tmp_path / "interrupted"
    args = train_args(data_root, out, "--step", "1", "--step_ckpt", str(reference_dir / "step0.pth"), *ewc)
    run_dir = out / "checkpoints" / "synthetic-15-5" / "run"
    run_until(args, lambda: any(run_dir.glob("step1-iter*.pth")), sig=signal.SIGKILL)
    assert not (run_dir / "step1.pth").exists()
    in_step = torch.load(next(run_dir.glob("step1-iter*.pth")), map_location="cpu", weights_only=False)
    assert set(in_step["regularizer_states"]) == {"ewc"}
    result = run_train_in_process(args)
    assert "step 1: resumed from iteration" in result.stdout + result.stderr

    resumed = torch.load(run_dir / "step1.pth", map_location="cpu", weights_only=False)
    expected = torch.load(reference_dir / "step1.pth", map_location="cpu", weights_only=False)
    assert_states_equal(resumed["model_state"], expected["model_state"])
    assert_states_equal(resumed["regularizers"]["ewc"]["fisher"], expected["regularizers"]["ewc"]["fisher"])
