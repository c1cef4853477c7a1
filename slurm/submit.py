"""Submit a whole incremental task to Slurm: one job per step chained by ``afterok``, or one job.

    python slurm/submit.py [--nodes N] [--tasks-per-node T] [--gpus-per-node G]
        [--cpus-per-task C] [--time T] [--partition P] [--account A] [--mem M]
        [--single-job] [--dry-run] -- <train.py options>

The train.py options are checked now, so that a wrong task, method, dataset folder or an
unwritable output folder is reported before anything is queued. The job scripts (see
``slurm/jobscript.py``) and the job logs go to ``<logdir>/<dataset>-<task>[-ov]/<name>/slurm/``;
squeue shows the jobs as ``<dataset>-<task>[-ov]-<name>-<step>``, e.g. ``voc-15-5-ov-MiB-step1``.

A requeued job keeps its resources. To continue a stopped task on others (another node, task or
GPU count), cancel its waiting jobs and submit it again with the new counts and a ``--batch_size``
that keeps ``--batch_size`` x processes: finished steps are skipped and the stopped step resumes
from its in-step checkpoint (the check of the same ``--name`` refuses another global batch).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make the package importable
    sys.path.insert(0, str(REPO_ROOT))

from segmentation import tasks  # noqa: E402
from segmentation.config import Config  # noqa: E402
from segmentation.data.readers import dataset_dir  # noqa: E402
from segmentation.engine import checkpoint  # noqa: E402
from segmentation.engine.options import parse_options  # noqa: E402
from segmentation.errors import RunError  # noqa: E402
from slurm.jobscript import JobSpec, render  # noqa: E402

TRAIN_SCRIPT = REPO_ROOT / "train.py"


class SubmitError(Exception):
    """A problem found before submitting: the message names the option at fault."""


@dataclass
class Job:
    label: str  # "step0" or "all"
    spec: JobSpec
    script_path: Path
    log_path: str  # with %j for the job id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slurm/submit.py",
        usage="python slurm/submit.py [options] -- <train.py options>",
        description="Submit the steps of an incremental task as Slurm jobs. By default each step "
        "of train.py's --step (all steps when it is not given) is one job, started when the job "
        "of the previous step has succeeded (--dependency=afterok); --single-job runs them in one "
        "job. A job stopped by its time limit or by preemption writes a checkpoint and requeues "
        "itself (the log counts the restarts); a job that fails for another reason is not "
        "requeued and cancels the jobs that wait for it. The train.py options are checked "
        "before anything is submitted.",
        epilog="Job scripts and logs (appended across requeues) go to "
        "<logdir>/<dataset>-<task>[-ov]/<name>/slurm/, checkpoints to train.py's --checkpoint_dir. "
        "Example, on CPU with 2 processes: python slurm/submit.py --gpus-per-node 0 "
        "--tasks-per-node 2 --cpus-per-task 1 -- --dataset synthetic --task 15-5 --method MiB "
        "--backbone resnet18 --crop_size 64 --epochs 10",
    )
    resources = parser.add_argument_group("resources of each job (#SBATCH lines of its script)")
    resources.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    resources.add_argument("--gpus-per-node", type=int, default=1, metavar="G",
                           help="GPUs per node; 0 trains on CPU with gloo (default: 1)")
    resources.add_argument("--tasks-per-node", type=int, default=None, metavar="T",
                           help="training processes per node (default: G, or 1 when G is 0)")
    resources.add_argument("--cpus-per-task", type=int, default=4, metavar="C",
                           help="CPUs per process: data-loader workers + 1 (default: 4)")
    resources.add_argument("--time", default=None, metavar="T",
                           help="time limit of each job, e.g. 24:00:00 (default: the partition's)")
    resources.add_argument("--partition", default=None, metavar="P", help="partition")
    resources.add_argument("--account", default=None, metavar="A", help="account to charge")
    resources.add_argument("--mem", default=None, metavar="M", help="memory per node, e.g. 64G")

    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument("--single-job", action="store_true",
                           help="run all the steps in one job instead of one job per step")
    behaviour.add_argument("--dry-run", action="store_true",
                           help="print the job scripts and the sbatch commands; submit nothing")
    behaviour.add_argument("--signal-seconds", type=int, default=300, metavar="S",
                           help="Slurm sends USR1 S seconds before the time limit, and the job "
                           "checkpoints and requeues itself (default: 300)")
    behaviour.add_argument("--max-restarts", type=int, default=50, metavar="R",
                           help="a job requeued R times after stop signals fails the next time "
                           "(default: 50)")
    return parser


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(submit options, train.py options) around the first ``--``."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    index = argv.index("--")
    return argv[:index], argv[index + 1:]


def _has_option(args: Sequence[str], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in args)


def _without_option(args: Sequence[str], name: str) -> List[str]:
    """``args`` without ``name VALUE`` / ``name=VALUE``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


def _check_writable_dir(path: Path, option: str) -> None:
    """``path`` is a directory we can write to, or can be created (nearest existing parent)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SubmitError(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SubmitError(f"{option} {path}: {existing} is not writable")


def check_train_options(train_args: List[str]) -> Config:
    """Parse train.py's options as train.py will, and check what would only fail in the job."""
    # Raises train.py's RunError on a bad task, method or step, a missing dataset folder or a
    # missing --step_ckpt file.
    config = parse_options(train_args)
    if config.dataset == "synthetic" and not Path(dataset_dir(config.dataset, config.data_root)).is_dir():
        _check_writable_dir(Path(config.data_root), "--data_root")  # written by the first job
    _check_writable_dir(Path(config.checkpoint_dir), "--checkpoint_dir")
    _check_writable_dir(Path(config.logdir), "--logdir")
    if config.split_dir is not None and not Path(config.split_dir).is_dir():
        raise SubmitError(f"--split_dir {config.split_dir}: folder not found")
    first = config.steps[0]
    if first > 0 and config.step_ckpt is None and not config.test:
        run = checkpoint.run_dir(config.checkpoint_dir, config.dataset, config.task, config.overlap, config.name)
        previous = checkpoint.step_checkpoint_path(run, first - 1)
        if not previous.is_file():
            raise SubmitError(f"--step {first}: it starts from the step {first - 1} checkpoint "
                              f"{previous}, which does not exist; submit step {first - 1} too or "
                              "give --step_ckpt")
    return config


def job_name(setting: str, name: str, label: str) -> str:
    """``<dataset>-<task>[-ov]-<name>-<step label>``, e.g. ``voc-15-5-ov-MiB-step1``: what squeue shows.

    Other characters than letters, digits, ``.``, ``_`` and ``-`` become ``_``: a space would end
    the #SBATCH line's value and a ``/`` would make a folder of the log file pattern's ``%x``.
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{setting}-{name}-{label}")


def plan_jobs(args: argparse.Namespace, train_args: List[str]) -> List[Job]:
    """The jobs to submit, in order (each one after the previous one)."""
    if args.nodes < 1 or args.gpus_per_node < 0 or args.cpus_per_task < 1:
        raise SubmitError("--nodes and --cpus-per-task must be >= 1, --gpus-per-node >= 0")
    tasks_per_node = max(args.gpus_per_node, 1) if args.tasks_per_node is None else args.tasks_per_node
    if tasks_per_node < 1:
        raise SubmitError("--tasks-per-node must be >= 1")
    if args.signal_seconds < 1 or args.max_restarts < 0:
        raise SubmitError("--signal-seconds must be >= 1 and --max-restarts >= 0")

    train_args = list(train_args)
    if not _has_option(train_args, "--step"):
        train_args += ["--step", "all"]
    if not _has_option(train_args, "--device"):
        train_args += ["--device", "cuda" if args.gpus_per_node > 0 else "cpu"]
    config = check_train_options(train_args)
    if config.device == "cuda" and args.gpus_per_node == 0:
        raise SubmitError("--device cuda (train.py) needs --gpus-per-node > 0")

    setting = f"{config.dataset}-{config.task}" + ("-ov" if config.overlap else "")
    slurm_dir = Path(checkpoint.run_dir(config.logdir, config.dataset, config.task, config.overlap, config.name))
    slurm_dir = (slurm_dir / "slurm").absolute()
    if args.single_job or len(config.steps) == 1:
        whole_task = config.steps == tuple(range(tasks.num_steps(config.dataset, config.task)))
        label = "all" if whole_task else "step" + "-".join(map(str, config.steps))
        groups = [(label, list(config.steps))]
    else:
        groups = [(f"step{step}", [step]) for step in config.steps]

    jobs = []
    for label, steps in groups:
        job_args = _without_option(train_args, "--step") + ["--step", ",".join(map(str, steps))]
        step_text = f"step {steps[0]}" if len(steps) == 1 else f"steps {','.join(map(str, steps))}"
        log_path = str(slurm_dir / f"{label}-%j.log")
        spec = JobSpec(
            job_name=job_name(setting, config.name, label),
            description=f"{step_text} of {config.dataset} {config.task}"
            + (" overlapped" if config.overlap else "") + f", run {config.name}",
            nodes=args.nodes,
            tasks_per_node=tasks_per_node,
            gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task,
            time=args.time,
            partition=args.partition,
            account=args.account,
            mem=args.mem,
            signal_seconds=args.signal_seconds,
            max_restarts=args.max_restarts,
            output=log_path,
            workdir=os.getcwd(),
            python=sys.executable,
            train_script=str(TRAIN_SCRIPT),
            train_args=job_args,
        )
        jobs.append(Job(label, spec, slurm_dir / f"{label}.sbatch", log_path))
    return jobs


def sbatch_command(job: Job, after: Optional[str]) -> List[str]:
    """``sbatch`` for ``job``; ``after``: the job id (or shell variable) it waits for."""
    command = ["sbatch", "--parsable"]
    if after is not None:
        # The job is cancelled when the one it waits for fails, even where the cluster's
        # DependencyParameters lack kill_invalid_depend.
        command += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    return command + [str(job.script_path)]


def print_dry_run(jobs: List[Job]) -> None:
    for job in jobs:
        print(f"# ---- {job.script_path}")
        print(render(job.spec))
    print("# ---- sbatch commands")
    for index, job in enumerate(jobs):
        command = sbatch_command(job, "PREVIOUS_JOB_ID" if index else None)
        text = " ".join(shlex.quote(part) for part in command)
        print(f"job{index}=$({text.replace('PREVIOUS_JOB_ID', f'$job{index - 1}')})")


def submit(jobs: List[Job]) -> List[str]:
    """Write the scripts and submit them in order; returns the job ids."""
    ids: List[str] = []
    for job in jobs:
        job.script_path.parent.mkdir(parents=True, exist_ok=True)
        job.script_path.write_text(render(job.spec))
        result = subprocess.run(sbatch_command(job, ids[-1] if ids else None), capture_output=True, text=True)
        if result.returncode != 0:
            if ids:  # do not leave half a chain queued
                subprocess.run(["scancel", *ids], capture_output=True)
            raise SubmitError(f"sbatch {job.script_path} failed: {result.stderr.strip() or result.stdout.strip()}"
                              + (f"; cancelled the jobs already submitted: {' '.join(ids)}" if ids else ""))
        ids.append(result.stdout.strip().split(";")[0])
    return ids


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    own, train_args = split_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if not train_args:
        parser.error("give train.py's options after '--', e.g. -- --dataset voc --task 15-5 --method MiB")
    try:
        jobs = plan_jobs(args, train_args)
        if args.dry_run:
            print_dry_run(jobs)
            return 0
        ids = submit(jobs)
    except SubmitError as error:
        print(f"slurm/submit.py: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:  # what train.py would refuse, with its exit code
        print(f"slurm/submit.py: error: train.py's options: {error}", file=sys.stderr)
        return error.exit_code
    for index, (job, job_id) in enumerate(zip(jobs, ids)):
        after = f" (starts when job {ids[index - 1]} has succeeded)" if index else ""
        print(f"{job.label}: job {job_id}{after}, log {job.log_path.replace('%j', job_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
