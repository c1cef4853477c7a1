"""train.py under torchrun and srun-style launches (2 processes, gloo): outputs, equivalence with 1
process (float64), exact resume, stop signals, sharded evaluation."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import build_once, copy_run, two_process_args
from train_cli_worker import (
    REPO_ROOT, assert_states_equal, default_workers, launcher_and_loader_workers, model_state, printed,
    run_checkpoints, run_srun_like, run_train, run_train_forked, run_train_in_process, run_until, train_args,
)

pytestmark = pytest.mark.distributed


def test_torchrun_trains_both_steps(two_process_run):
    run_dir = run_checkpoints(two_process_run)
    assert sorted(p.name for p in run_dir.iterdir()) == ["step0.pth", "step1.pth"]
    for step in (0, 1):
        results = json.loads((two_process_run / "logs" / "synthetic-15-5" / "run" / f"step{step}.json").read_text())
        assert results["step"] == step and 0.0 <= results["miou_all"] <= 1.0
        assert not any(key.startswith("module.") for key in model_state(run_dir / f"step{step}.pth"))


def _float64_ewc_args(data_root, out, batch_size):
    # 32 px crops: float64 convolutions are slow on CPU.
    args = train_args(data_root, out, "--step", "all", "--method", "EWC", "--dtype", "float64", "--crop_size", "32")
    args[args.index("--batch_size") + 1] = str(batch_size)
    args[args.index("--lr") + 1] = "0.001"  # measured: ~1e-13 apart (~1e-11 at LR 0.01)
    return args


def _assert_close(one, two, key, rel=1e-9):
    assert one.dtype == two.dtype == torch.float64, key
    scale = one.abs().max().item()
    assert (one - two).abs().max().item() <= rel * scale + 1e-300, key


def _step_checkpoints(out):
    return [torch.load(run_checkpoints(out) / f"step{step}.pth", map_location="cpu", weights_only=False)
            for step in (0, 1)]


@pytest.fixture(scope="session")
def float64_ewc_run(data_root, tmp_path_factory):
    """Both steps of EWC in float64 on 1 process of 4 images: what every split of that global batch
    over processes, interrupted or not, must end equal to."""
    return build_once(tmp_path_factory, "float64-ewc-run",
                      lambda out: run_train_in_process(_float64_ewc_args(data_root, out, batch_size=4)))


def _assert_equal_float64_runs(one_run, other_run, name):
    """The weights and EWC's Fisher of both steps agree to 1e-9 (relative)."""
    for step, (one, two) in enumerate(zip(_step_checkpoints(one_run), _step_checkpoints(other_run))):
        assert one["model_state"].keys() == two["model_state"].keys()
        for key, value in one["model_state"].items():
            if value.is_floating_point():
                _assert_close(value, two["model_state"][key], f"{name} step {step} {key}")
            else:
                assert torch.equal(value, two["model_state"][key]), key
        fisher_one, fisher_two = one["method_states"]["ewc"]["fisher"], two["method_states"]["ewc"]["fisher"]
        assert fisher_one.keys() == fisher_two.keys()
        for key, value in fisher_one.items():
            _assert_close(value, fisher_two[key], f"{name} step {step} Fisher {key}")


@pytest.mark.slow
def test_one_process_equals_two_processes_and_fused_kernels_equal_the_reference_in_float64(
        float64_ewc_run, data_root, tmp_path):
    # Same global batch (1 x 4 images, 2 x 2 images), two steps of EWC from scratch. In exact
    # arithmetic the runs are equal; float64 keeps the reduction-order rounding (~1e-16) from
    # growing to a visible size, so weights and Fisher must agree to 1e-9. (In float32 the same
    # rounding is amplified by training, as with a different thread count.) The Fisher, a running
    # mean of squared gradients, compares the gradients themselves.
    # The second run takes In-Place ABN's compiled kernels on 2 processes: the synchronised path,
    # whose four kernels pool the statistics over the processes between them (what
    # `torchrun --nproc_per_node 8 train.py` runs on GPUs).
    runs = {name: tmp_path / name for name in ("two", "two-fused")}
    run_train(_float64_ewc_args(data_root, runs["two"], batch_size=2) + ["--norm_kernels", "reference"], nproc=2)
    result = run_train(_float64_ewc_args(data_root, runs["two-fused"], batch_size=2) + ["--norm_kernels", "fused"],
                       nproc=2)
    assert "In-Place ABN kernels: fused (compiled)" in result.stdout + result.stderr
    for name, run in runs.items():
        _assert_equal_float64_runs(float64_ewc_run, run, name)


@pytest.mark.slow
def test_step_interrupted_on_one_process_count_resumes_on_another_with_the_same_global_batch(
        float64_ewc_run, data_root, tmp_path):
    # Global batch 4: 2 x 2 images killed after iteration 3 of step 0 (in-step checkpoint of
    # iteration 2), rerun as 1 x 4 under the same --name; and 1 x 4 killed, rerun as 2 x 2. Both end
    # equal to the uninterrupted 1 x 4 run (float64, 1e-9). The 2 processes are forked from this one
    # with srun's variables (what they compute together is tested here, the launches elsewhere).
    kill = {"SEGMENTATION_FAULT": "kill:train-iteration:3"}
    two_then_one, one_then_two = tmp_path / "two-then-one", tmp_path / "one-then-two"

    def args(out, batch_size):
        return _float64_ewc_args(data_root, out, batch_size) + ["--ckpt_interval", "2"]

    run_srun_like(args(two_then_one, 2), ntasks=2, fork=True, env=kill, check=False)
    in_step = torch.load(run_checkpoints(two_then_one) / "step0-iter2.pth", map_location="cpu", weights_only=False)
    assert not (run_checkpoints(two_then_one) / "step0.pth").exists()
    # The processes' generators are alike (so either one's state serves every process of a rerun).
    first, second = in_step["rng_states"]
    assert torch.equal(first["torch"], second["torch"]) and first["python"] == second["python"]
    output = printed(run_train_in_process(args(two_then_one, 4)))
    assert "step 0: resumed from iteration 2 (epoch 1 of 1) on 1 process(es) (was 2)" in output, output

    killed = run_train_forked(args(one_then_two, 4), check=False, env=kill)
    assert killed.returncode < 0 and (run_checkpoints(one_then_two) / "step0-iter2.pth").exists(), printed(killed)
    outputs = run_srun_like(args(one_then_two, 2), ntasks=2, fork=True)
    assert "step 0: resumed from iteration 2 (epoch 1 of 1) on 2 process(es) (was 1)" in outputs[0], outputs[0]

    for name, run in (("2 then 1", two_then_one), ("1 then 2", one_then_two)):
        _assert_equal_float64_runs(float64_ewc_run, run, name)


def _check_resume(amp, output_dir, *options):
    """``launch/check_resume.py`` (an uninterrupted run, one killed mid-step, its rerun): its report."""
    command = [sys.executable, os.path.join(REPO_ROOT, "launch", "check_resume.py"), "--amp", amp, "--nproc", "2",
               "--channels_last", "--norm_kernels", "fused", "--output_dir", str(output_dir), *options]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    report = json.loads((output_dir / f"resume-{amp}.json").read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert 0 < report["resumed_from"] < report["killed_after"] < report["iterations"], report
    if amp == "fp16":
        # The GradScaler's state went through the checkpoint: a scale that the first iterations'
        # overflows lowered from its initial 2**16, and the successful steps since it last changed.
        assert 0 < report["scaler_scale_at_checkpoint"] < 2.0 ** 16, report
        assert 0 <= report["scaler_steps_at_checkpoint"] <= report["resumed_from"], report
    return report


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_channels_last_fused_run_killed_and_resumed_is_bit_identical(amp, tmp_path):
    # 2 processes, --amp bf16|fp16 --channels_last --norm_kernels fused: SIGKILL after iteration 3,
    # the rerun resumes from the in-step checkpoint of iteration 2 and ends bit-identical.
    report = _check_resume(amp, tmp_path, "--dry_run")
    assert report["bit_identical"], report


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_killed_and_resumed(amp, tmp_path):
    # 20 iterations of 2 processes sharing the GPU(s) through gloo; CUDA's atomic additions make two
    # uninterrupted runs differ already, so the resumed run must stay within 10 times that.
    report = _check_resume(amp, tmp_path, "--device", "cuda", "--dist_backend", "gloo")
    assert report["relative_difference"] <= report["tolerance"], report


@pytest.mark.slow
def test_torchrun_killed_mid_step_resumes_bit_identically(two_process_run, data_root, tmp_path):
    # Step 0 only: what follows a resumed step is the chained-run test's (test_train_resume.py).
    args = two_process_args(data_root, tmp_path)
    args[args.index("--step") + 1] = "0"
    run_dir = run_checkpoints(tmp_path)
    code, _ = run_until(args, lambda: any(run_dir.glob("step0-iter*.pth")), sig=signal.SIGKILL, nproc=2)
    assert code != 0 and not (run_dir / "step0.pth").exists()
    result = run_train(args, nproc=2)
    assert "step 0: resumed from iteration" in result.stdout + result.stderr
    assert_states_equal(model_state(run_dir / "step0.pth"), model_state(run_checkpoints(two_process_run) / "step0.pth"))


@pytest.mark.slow
def test_stop_signal_under_torchrun_stops_every_rank_with_a_checkpoint(data_root, tmp_path):
    # SIGUSR1 to torchrun and to the ranks' default data-loader workers: the workers ignore it;
    # torchrun does not handle it and dies, and its ranks then stop as if they had got SIGTERM.
    # (SIGTERM to torchrun is passed on to the ranks by torchrun itself.)
    args = default_workers(train_args(data_root, tmp_path, "--step", "0", "--epochs", "3", "--ckpt_interval", "2"))
    run_dir = run_checkpoints(tmp_path)
    code, output = run_until(args, lambda: any(run_dir.glob("step0-iter*.pth")), sig=signal.SIGUSR1, nproc=2,
                             targets=launcher_and_loader_workers)
    assert code != 0
    assert output.count("stopped by a signal") == 1, output  # reported once: every rank stopped alike
    assert not (run_dir / "step0.pth").exists()
    stopped_at = int(re.search(r"stopped by a signal after iteration (\d+)", output).group(1))
    assert (run_dir / f"step0-iter{stopped_at}.pth").exists()


def test_two_process_test_scores_equal_single_process_scores(two_process_run, data_root, tmp_path):
    # The 2-process run tested step 1 on 2 shards; a 1-process --test of the same checkpoint
    # must count exactly the same pixels (no padded or dropped samples).
    out = copy_run(two_process_run, tmp_path)
    args = two_process_args(data_root, out)
    args[args.index("--step") + 1] = "1"
    run_train_in_process([*args, "--test"])
    logs = out / "logs" / "synthetic-15-5" / "run"
    sharded = json.loads((logs / "step1.json").read_text())
    single = json.loads((logs / "eval-step1.json").read_text())
    for key in ("class_iou", "overall_acc", "mean_acc", "miou_all", "miou_new_fg"):
        assert single[key] == pytest.approx(sharded[key], rel=1e-12), key


def test_srun_launch_equals_torchrun_launch(two_process_run, data_root, tmp_path):
    # Same world size and batch split, so the weights must be bit-identical to the torchrun run.
    step0 = run_checkpoints(two_process_run) / "step0.pth"
    args = two_process_args(data_root, tmp_path)
    args[args.index("--step") + 1] = "1"
    outputs = run_srun_like([*args, "--step_ckpt", str(step0)], ntasks=2)
    assert "2 process(es)" in outputs[0]
    assert_states_equal(model_state(run_checkpoints(tmp_path) / "step1.pth"),
                        model_state(run_checkpoints(two_process_run) / "step1.pth"))


def test_original_launcher_and_entry_point(two_process_run, data_root, tmp_path):
    # The original README's launch, `python -m torch.distributed.launch --nproc_per_node=2 run.py ...`
    # (the launcher passes --local-rank=<k>; the original's options are test_original_command_lines.py's),
    # here testing the shared run's step 1 again on the same 2 shards: the same scores.
    out = copy_run(two_process_run, tmp_path)
    args = two_process_args(data_root, out)
    args[args.index("--step") + 1] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.launch", "--standalone", "--nproc_per_node=2"]
    result = run_train([*args, "--test"], launcher=launcher, script=os.path.join(REPO_ROOT, "run.py"))
    assert "2 process(es)" in result.stdout
    logs = out / "logs" / "synthetic-15-5" / "run"
    tested, trained = (json.loads((logs / name).read_text()) for name in ("eval-step1.json", "step1.json"))
    for key in ("class_iou", "overall_acc", "miou_all", "miou_old", "miou_new"):
        assert tested[key] == trained[key], key
