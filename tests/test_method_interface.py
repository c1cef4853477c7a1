"""Adding a method is one module and one registry line: tests/toy_method.py's TOY, with its own
option, preset, loss term and state, trains two steps through train.py, and a run killed mid-step
resumes bit-exactly, its state included."""
import os
import signal

import pytest
import torch

import toy_method
from segmentation.methods import REGISTRY
from train_cli_worker import REPO_ROOT, assert_states_equal, run_train_in_process, run_until, train_args

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(REPO_ROOT, "tests", "toy_method.py")


@pytest.fixture
def toy_registered(monkeypatch):
    """The registry line of ``toy_method.register``, undone after the test."""
    monkeypatch.setitem(REGISTRY, toy_method.Toy.name, toy_method.Toy)


def _step(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_toy_method_trains_two_steps_and_resumes_bit_exactly(toy_registered, data_root, tmp_path):
    args = ("--method", "toy", "--crop_size", "32")
    # The reference writes no in-step checkpoints (their interval does not change the weights).
    reference = tmp_path / "reference"
    result = run_train_in_process(train_args(data_root, reference, *args, "--step", "all"))
    output = result.stdout + result.stderr
    assert "TOY preset filled in: toy_weight=0.5" in output and "loss_toy=" in output
    reference_dir = reference / "checkpoints" / "synthetic-15-5" / "run"
    step0, step1 = _step(reference_dir / "step0.pth"), _step(reference_dir / "step1.pth")
    # The state went from step 0 to step 1: the iteration count continues.
    assert 0 < step0["method_states"]["toy"]["iterations"] < step1["method_states"]["toy"]["iterations"]
    assert step1["options"]["toy_weight"] == 0.5

    # Step 1 from that step 0, killed after an in-step checkpoint (a process of its own: the
    # registry line runs in tests/toy_method.py), then resumed.
    out = tmp_path / "interrupted"
    run_dir = out / "checkpoints" / "synthetic-15-5" / "run"
    step1_args = train_args(data_root, out, *args, "--ckpt_interval", "1", "--step", "1",
                            "--step_ckpt", str(reference_dir / "step0.pth"))
    run_until(step1_args, lambda: any(run_dir.glob("step1-iter*.pth")), sig=signal.SIGKILL, script=SCRIPT)
    assert not (run_dir / "step1.pth").exists()
    assert "toy" in _step(next(run_dir.glob("step1-iter*.pth")))["method_states"]
    result = run_train_in_process(step1_args)
    assert "step 1: resumed from iteration" in result.stdout + result.stderr
    resumed = _step(run_dir / "step1.pth")
    assert_states_equal(resumed["model_state"], step1["model_state"])
    assert resumed["method_states"]["toy"]["iterations"] == step1["method_states"]["toy"]["iterations"]
    assert torch.equal(resumed["method_states"]["toy"]["running"], step1["method_states"]["toy"]["running"])


def test_toy_option_is_checked(toy_registered, data_root, tmp_path):
    result = run_train_in_process(train_args(data_root, tmp_path, "--toy_weight", "-1"), check=False)
    assert result.returncode == 2 and "--toy_weight must be >= 0, got -1.0" in result.stderr
