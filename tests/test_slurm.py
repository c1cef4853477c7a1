"""slurm/: the submit tool and its job scripts, run against a real Slurm on this machine.

The cluster is the one ``slurm/local-cluster/up.sh --nodes 2`` starts (``.ci/run`` starts it before
the tests): two nodes, each a network namespace with its own address, host name and slurmd. When
no cluster runs, these tests start that one themselves if they can (root, apt) and stop it
afterwards; otherwise the tests that need it are skipped with the reason, as are the multi-node
tests on a cluster of one node. The jobs train a tiny synthetic task (ResNet-18, 48 px crops,
1 epoch) with 2 processes (gloo on CPU), on one node or on two.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segmentation.data.synthetic import DIR_NAME, generate_synthetic_voc
from segmentation.launch_env import read_env
from slurm import jobscript, submit
from conftest import slurm_answers, two_process_args
from train_cli_worker import REPO_ROOT, assert_states_equal, default_workers, model_state, train_args

UP = os.path.join(REPO_ROOT, "slurm", "local-cluster", "up.sh")
DOWN = os.path.join(REPO_ROOT, "slurm", "local-cluster", "down.sh")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}
CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1"]
TWO_NODES = ["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1"]
NODES = ["localci-node1", "localci-node2"]  # up.sh --nodes 2

# One cluster, one test at a time: its 2 CPUs run one 2-task job.
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]


# ---------------------------------------------------------------- the cluster
@pytest.fixture(scope="session")
def cluster():
    """A running local Slurm: the one already up, or one started here (and stopped after)."""
    if slurm_answers():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm cluster answers and starting the local one (slurm/local-cluster/up.sh) "
                    "needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm cluster answers, Slurm is not installed and there is no apt-get to install it")
    subprocess.run(["bash", UP, "--nodes", "2"], check=True, stdin=subprocess.DEVNULL, timeout=600)
    try:
        yield
    finally:
        subprocess.run(["bash", DOWN], check=False, stdin=subprocess.DEVNULL, timeout=300)


@pytest.fixture(scope="session")
def two_nodes(cluster):
    """The local cluster's nodes, when it has two (up.sh --nodes 2)."""
    listed = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], capture_output=True, text=True)
    nodes = sorted(set(listed.stdout.split()))
    if nodes != NODES:
        pytest.skip(f"the multi-node tests need the two nodes of 'bash {UP} --nodes 2'; the running cluster has "
                    f"{', '.join(nodes) or 'none'}")
    return nodes


def _job_field(job_id: str, name: str) -> str:
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    match = re.search(rf"\b{name}=(\S+)", result.stdout)
    return match.group(1) if match else ""


def _wait_for(job_ids, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not all(_job_field(job_id, "JobState") in FINAL_STATES for job_id in job_ids):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids])
            raise AssertionError(f"jobs {job_ids} did not end within {timeout} s")
        time.sleep(1)


def _submit(options, train_options, cwd, **env) -> list:
    """Run slurm/submit.py (the jobs inherit ``env``); the (label, job id, log file) of each job it printed."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "slurm", "submit.py"), *options, "--", *train_options],
        cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = re.findall(r"^(\S+): job (\d+).*, log (\S+)$", result.stdout, flags=re.M)
    assert jobs, result.stdout
    return [(label, job_id, Path(log)) for label, job_id, log in jobs]


# ---------------------------------------------------------------- the task
def _task_args(data_root, out):
    """The shared two-process run's task, one job per step (submit.py's --step all), an in-step
    checkpoint every iteration: 7 iterations in step 0, time enough to stop it mid-step. With the
    default data-loader workers: Slurm signals them too."""
    return default_workers(two_process_args(data_root, out, "--ckpt_interval", "1"))


# ---------------------------------------------------------------- tests with jobs
def _stop_mid_step(job_id: str, run_dir: Path, log: Path) -> None:
    """Once step 0 has written an in-step checkpoint, what Slurm does before a time limit
    (--signal=B:USR1@S) or on preemption: USR1 to the batch shell."""
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("step0-iter*.pth")):
        assert time.monotonic() < deadline and _job_field(job_id, "JobState") not in FINAL_STATES, (
            log.read_text() if log.exists() else "no log")
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)


def _assert_equal_to_the_run_without_slurm(run_dir: Path, two_process_run: Path) -> None:
    for step in (0, 1):
        reference = two_process_run / "checkpoints" / "synthetic-15-5" / "run" / f"step{step}.pth"
        assert_states_equal(model_state(run_dir / f"step{step}.pth"), model_state(reference))


def test_failed_step_cancels_the_steps_that_depend_on_it(cluster, tmp_path):
    data = tmp_path / "data"
    generate_synthetic_voc(str(data / DIR_NAME), num_train=40, num_val=20, width=64, height=48)
    (data / DIR_NAME / "SegmentationClassAug" / "syn_train_000000.png").write_bytes(b"not a png")
    one_process = ["--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1"]
    jobs = _submit(one_process, train_args(str(data), tmp_path, task="10-5-5"), tmp_path)
    ids = [job_id for _, job_id, _ in jobs]
    assert len(ids) == 3
    _wait_for(ids)
    text = jobs[0][2].read_text()
    assert _job_field(ids[0], "JobState") == "FAILED", text
    assert _job_field(ids[0], "Restarts") == "0", text  # a real failure is not requeued
    assert "syn_train_000000.png" in text  # the cause, from train.py
    assert "FAILED: step 0 of synthetic 10-5-5, run run: train.py exited with code 1" in text
    assert f"cancelling the jobs that depend on this one: {ids[1]} {ids[2]}" in text
    assert [_job_field(job_id, "JobState") for job_id in ids[1:]] == ["CANCELLED", "CANCELLED"]
    assert all(not jobs[k][2].exists() for k in (1, 2)), "a cancelled step must never have started"


# ---------------------------------------------------------------- jobs on two nodes
@pytest.mark.slow
def test_two_nodes_train_as_two_processes_on_one(two_nodes, data_root, two_process_run, tmp_path):
    """One process on each of two nodes, one job per step (afterok): the rendezvous on the first node, gloo
    across the nodes, and step checkpoints bit-identical to torchrun's 2 processes on one node."""
    jobs = _submit(TWO_NODES, two_process_args(data_root, tmp_path), tmp_path)
    ids = [job_id for _, job_id, _ in jobs]
    _wait_for(ids)
    logs = [log.read_text() for _, _, log in jobs]
    for job_id, text in zip(ids, logs):
        assert _job_field(job_id, "JobState") == "COMPLETED", text
        assert _job_field(job_id, "NodeList") == "localci-node[1-2]", text
        assert f"processes: {NODES[0]}: rank 0 (local rank 0, cpu); {NODES[1]}: rank 1 (local rank 0, cpu)" in text
    _assert_equal_to_the_run_without_slurm(tmp_path / "checkpoints" / "synthetic-15-5" / "run", two_process_run)


@pytest.mark.slow
def test_two_nodes_stopped_mid_step_requeue_resume_on_both_and_end_bit_identical(two_nodes, data_root,
                                                                                 two_process_run, tmp_path):
    """The same submission with the default data-loader workers; its step-0 job is stopped mid-step as
    before a time limit or on preemption (USR1 to the batch shell): srun passes the signal to the process
    on each node, both checkpoint and exit with 3, the job requeues itself and resumes on both nodes."""
    jobs = _submit(TWO_NODES, _task_args(data_root, tmp_path), tmp_path)
    assert [label for label, _, _ in jobs] == ["step0", "step1"]
    ids = [job_id for _, job_id, _ in jobs]
    assert _job_field(ids[1], "Dependency") == f"afterok:{ids[0]}(unfulfilled)"
    assert _job_field(ids[0], "JobName") == "synthetic-15-5-run-step0"

    run_dir = tmp_path / "checkpoints" / "synthetic-15-5" / "run"
    _stop_mid_step(ids[0], run_dir, jobs[0][2])
    _wait_for(ids)

    logs = [log.read_text() for _, _, log in jobs]
    for job_id, text, restarts in zip(ids, logs, ("1", "0")):
        assert _job_field(job_id, "JobState") == "COMPLETED", text
        assert _job_field(job_id, "Restarts") == restarts, text
    # One log across the requeue: both starts, with the restart count, and the resumption.
    assert "SLURM_RESTART_COUNT=0" in logs[0] and "SLURM_RESTART_COUNT=1" in logs[0]
    assert "received SIGUSR1" in logs[0] and "requeueing the job (restart 1)" in logs[0]
    # Every process on both nodes, the data-loader workers included, got the signal and wrote a checkpoint.
    assert "stopped with an in-step checkpoint" in logs[0] and "train.py: error" not in logs[0], logs[0]
    for node, rank in zip(NODES, (0, 1)):
        assert f"srun: error: {node}: task {rank}: Exited with exit code 3" in logs[0], logs[0]
    assert re.search(r"step 0: resumed from iteration \d+ \(epoch 1 of 1\) on 2 process\(es\)", logs[0]), logs[0]
    first, resumed = logs[0].split("SLURM_RESTART_COUNT=1")
    placement = f"processes: {NODES[0]}: rank 0 (local rank 0, cpu); {NODES[1]}: rank 1 (local rank 0, cpu)"
    assert placement in first and placement in resumed and placement in logs[1], logs
    assert "done: step 0 of synthetic 15-5" in logs[0] and "done: step 1 of synthetic 15-5" in logs[1]
    _assert_equal_to_the_run_without_slurm(run_dir, two_process_run)


def test_two_nodes_of_two_processes_place_ranks_by_node(two_nodes, data_root, tmp_path):
    """4 ranks, 2 per node: each process reports its node, rank and local rank as srun placed it."""
    jobs = _submit(["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1"],
                   train_args(data_root, tmp_path, "--step", "0", "--batch_size", "1"), tmp_path)
    (_, job_id, log), = jobs
    _wait_for([job_id])
    text = log.read_text()
    assert _job_field(job_id, "JobState") == "COMPLETED", text
    assert "4 process(es)" in text and "done: step 0 of synthetic 15-5" in text, text
    assert (f"processes: {NODES[0]}: rank 0 (local rank 0, cpu), rank 1 (local rank 1, cpu); "
            f"{NODES[1]}: rank 2 (local rank 0, cpu), rank 3 (local rank 1, cpu)") in text, text
    assert (tmp_path / "checkpoints" / "synthetic-15-5" / "run" / "step0.pth").exists()


def test_a_process_killed_on_the_second_node_fails_the_job_naming_it(two_nodes, data_root, tmp_path):
    """SIGKILL of rank 1 (on the second node) mid-step, as by the kernel's OOM killer: the job fails
    at once, names the node and rank, is not requeued and cancels the next step."""
    jobs = _submit(TWO_NODES, two_process_args(data_root, tmp_path), tmp_path,
                   SEGMENTATION_FAULT="kill:train-iteration:3@1")
    ids = [job_id for _, job_id, _ in jobs]
    _wait_for(ids, timeout=300)
    text = jobs[0][2].read_text()
    assert _job_field(ids[0], "JobState") == "FAILED" and _job_field(ids[0], "Restarts") == "0", text
    failed = re.search(r"FAILED: step 0 of synthetic 15-5, run run: train\.py exited with code \d+ \(srun: (.*)\); "
                       r"not requeued", text)
    assert failed, text
    assert f"rank 1 on {NODES[1]}: Killed" in failed.group(1).split("; "), text
    # The process left on the first node says why it stopped.
    assert "rank 0 of 2: lost the connection to another process at the check after iteration 3" in text, text
    assert _job_field(ids[1], "JobState") == "CANCELLED", text


# ---------------------------------------------------------------- scripts and submit-time checks
def _dry_run(capsys, options, train_options):
    assert submit.main([*options, "--dry-run", "--", *train_options]) == 0
    return capsys.readouterr().out


def test_multi_node_script_rendezvous(cluster, data_root, tmp_path, capsys):
    out = _dry_run(capsys, ["--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "6", "--time", "4:00:00",
                            "--partition", "gpu", "--account", "lab", "--mem", "100G", "--single-job"],
                   train_args(data_root, tmp_path, "--device", "cuda"))
    assert not (tmp_path / "logs").exists(), "--dry-run writes nothing"
    script = out.split("# ---- sbatch commands")[0]
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", script, flags=re.M))
    assert sbatch["nodes"] == "4" and sbatch["ntasks-per-node"] == "8" and sbatch["gpus-per-node"] == "8"
    assert (sbatch["cpus-per-task"], sbatch["time"], sbatch["partition"], sbatch["account"], sbatch["mem"]) == (
        "6", "4:00:00", "gpu", "lab", "100G")
    assert sbatch["signal"] == "B:USR1@300" and "requeue" in sbatch and sbatch["open-mode"] == "append"
    # The launch takes every task of the allocation; the rendezvous comes from the node list and job id.
    assert re.search(r"^srun --cpus-per-task=\S+ \S+python\S* \S+/train\.py .*--step 0,1", script, flags=re.M)
    rendezvous = "\n".join(line for line in script.splitlines() if line.startswith(("MASTER_", "export MASTER")))
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "123456"}
    printed = subprocess.run(["bash", "-c", rendezvous + '\necho "$MASTER_ADDR $MASTER_PORT"'], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
    # The same port as train.py derives itself under srun when MASTER_PORT is not set.
    engine = read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "SLURM_JOB_ID": "123456",
                       "SLURM_NODELIST": "gpu[07-09,12]"})
    assert printed == ["gpu07", str(engine.master_port)]
    ports = {subprocess.run(["bash", "-c", rendezvous + '\necho "$MASTER_PORT"'], capture_output=True, text=True,
                            env={**os.environ, "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": str(job)}).stdout
             for job in (1, 2)}
    assert len(ports) == 2, "two jobs on one node need two ports"


def test_dry_run_prints_the_chain(data_root, tmp_path, capsys):
    out = _dry_run(capsys, CPU_JOB, train_args(data_root, tmp_path))
    run_logs = tmp_path / "logs" / "synthetic-15-5" / "run" / "slurm"
    assert f"# ---- {run_logs / 'step0.sbatch'}" in out and f"# ---- {run_logs / 'step1.sbatch'}" in out
    commands = out.split("# ---- sbatch commands\n")[1].splitlines()
    assert commands == [
        f"job0=$(sbatch --parsable {run_logs / 'step0.sbatch'})",
        f"job1=$(sbatch --parsable --dependency=afterok:$job0 --kill-on-invalid-dep=yes {run_logs / 'step1.sbatch'})",
    ]
    assert "--step 0 " in out.split("step1.sbatch")[0] and "--step 1 " in out.split("step1.sbatch")[1]
    assert re.findall(r"^#SBATCH --job-name=(\S+)", out, flags=re.M) == ["synthetic-15-5-run-step0",
                                                                         "synthetic-15-5-run-step1"]
    assert not (tmp_path / "logs").exists()


def test_job_names_say_dataset_task_name_and_step():
    assert submit.job_name("voc-15-5-ov", "MiB", "step1") == "voc-15-5-ov-MiB-step1"
    # Nothing that would end the #SBATCH value or make a folder of the log pattern's %x.
    assert submit.job_name("ade-100-50", "my run/2%", "all") == "ade-100-50-my_run_2_-all"


@pytest.mark.parametrize(
    "train_options, message",
    [
        (["--task", "15-7"], "--task 15-7"),
        (["--method", "MiBB"], "--method MiBB: unknown method"),
    ],
)
def test_submit_refuses_what_train_py_refuses(data_root, tmp_path, capsys, train_options, message):
    assert submit.main([*CPU_JOB, "--", *train_args(data_root, tmp_path), *train_options]) == 2
    assert message in capsys.readouterr().err


def test_submit_refuses_missing_dataset_and_unwritable_folders(data_root, tmp_path, capsys):
    def error(*train_options):
        assert submit.main([*CPU_JOB, "--", *train_args(data_root, tmp_path), *train_options]) == 2
        return capsys.readouterr().err

    code = submit.main([*CPU_JOB, "--", *train_args(data_root, tmp_path), "--dataset", "voc", "--data_root",
                        str(tmp_path / "none"), "--no_pretrained"])  # found by train.py's own checks
    assert code == 1 and f"no dataset at {tmp_path / 'none' / 'PascalVOC12'}" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert f"--checkpoint_dir {a_file / 'ckpt'}: {a_file} is not a directory" in error(
        "--checkpoint_dir", str(a_file / "ckpt"))
    assert f"--logdir {a_file}: {a_file} is not a directory" in error("--logdir", str(a_file))
    assert "step 0 checkpoint" in error("--step", "1")
    if os.geteuid() != 0:  # root may write anywhere
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        assert "is not writable" in error("--checkpoint_dir", str(read_only / "ckpt"))
    assert not list(tmp_path.glob("**/*.sbatch")), "nothing is submitted after an error"


def test_example_scripts_are_rendered_from_the_template():
    for name, spec in jobscript.example_specs().items():
        text = (Path(REPO_ROOT) / "slurm" / name).read_text()
        assert text == jobscript.render(spec), f"slurm/{name} is stale: run python -m slurm.jobscript"
        assert '"$@"' in text and subprocess.run(["bash", "-n", "-c", text]).returncode == 0
