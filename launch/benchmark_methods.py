"""Benchmark every method of the paper's tables on the synthetic dataset with one command.

    python launch/benchmark_methods.py --out benchmark [--nproc 2] [--methods FT,MiB] ...

Runs the grid methods x settings (tasks 15-5 and 15-1, disjoint and overlapped) plus Joint (the
``offline`` task) through the normal ``train.py`` command, then writes

- ``<out>/results.md``: the paper's table (old / new / all after the last step), once over the
  foreground classes only (the MiB paper's convention) and once with the background counted
  among the old classes and in "all" (PLOP's convention), plus the commands and the wall time;
- ``<out>/results.png``: mIoU of the old, new and all classes after each step, one line per
  method (Joint as a dashed line).

Step 0 is trained once per setting for every method whose step 0 is plain cross-entropy (FT, LwF,
ILT, MiB, and EWC, PI, RW, whose penalty is zero at step 0) and shared with them (its checkpoint is
linked into each run's folder). That run estimates EWC's, PI's and RW's importances on the way
(``--estimate_importance``), which only reads the gradients, so it trains the same weights as their
own step 0 would. LwF-MC (BCE from step 0) and PLOP (its label protocol) train their own step 0.
15-5 and 15-1 share the step-0 models, as the original authors did. Finished runs (their last
step's results file exists) are skipped, so the script can be stopped and restarted. Progress and
an ETA are printed after every run.

``--jobs`` runs that many trainings at once (each with its share of the cores as threads), a run
starting once the step-0 model it needs is finished. On a small CPU this is much faster than one
run at a time: a small model on 64-pixel crops keeps two threads poorly busy, and process start,
checkpoints and evaluation are mostly single-threaded. Each run's console output (its command
first) goes to ``console.log`` in its own log folder, beside the ``train.log`` that train.py writes.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from segmentation import tasks  # noqa: E402
from segmentation.data.synthetic import ensure_synthetic_voc  # noqa: E402
from segmentation.methods import REGISTRY, shares_step0  # noqa: E402

DATASET = "synthetic"
STEP0_TASK = "15-5"  # 15-1 starts from the same 15-class step-0 models
JOINT = "Joint"


@dataclass
class Job:
    """One ``train.py`` launch; done when ``results`` exists."""

    label: str
    args: List[str]
    results: Path
    work: int  # estimated cost, for the ETA and the order of the runs (see ``step_work``)
    link_step0: Optional[Path] = None  # step-0 checkpoint to link into this run's folder first
    step0_results: Optional[Path] = None  # written by the step-0 run this one waits for

    @property
    def log(self) -> Path:
        return self.results.parent / "console.log"


@dataclass
class Grid:
    methods: List[str]
    tasks: List[str]
    overlaps: List[bool]
    common: List[str]
    out: Path
    jobs: List[Job] = field(default_factory=list)

    @property
    def settings(self) -> List[tuple]:
        """(task, overlap) of every column group of the tables and row of the plot."""
        return [(task, overlap) for task in self.tasks for overlap in self.overlaps]


def setting_name(task: str, overlap: bool) -> str:
    return f"{DATASET}-{task}" + ("-ov" if overlap else "")


def step0_group(method: str) -> str:
    """Methods whose step 0 is the same cross-entropy training share one step-0 model."""
    return "shared" if shares_step0(method) else method


def run_paths(out: Path, task: str, overlap: bool, name: str):
    checkpoints = out / "checkpoints" / setting_name(task, overlap) / name
    logs = out / "logs" / setting_name(task, overlap) / name
    return checkpoints, logs


def step_work(task: str, step: int) -> int:
    """Estimated cost of training ``step``: the step's classes (its training images grow with them)
    plus one for the fixed cost of every step (data setup, validation, test)."""
    return len(tasks.labels_of_step(DATASET, task, step)) + 1


def method_flags(method: str) -> List[str]:
    return [] if method == JOINT else ["--method", method]


def estimate_flags(methods: Sequence[str]) -> List[str]:
    """``--estimate_importance`` for the regularizers of ``methods`` that start from the shared step 0."""
    names = [getattr(REGISTRY[m], "regularizer", None) for m in methods if m in REGISTRY and shares_step0(m)]
    names = [name for name in names if name]
    return ["--estimate_importance", *names] if names else []


def build_grid(grid: Grid) -> None:
    """Step-0 jobs first, then the incremental steps of every (task, setting, method), then Joint."""
    out = grid.out
    step0_of: Dict[tuple, tuple] = {}  # (overlap, group) -> (checkpoint, results file)
    for overlap in grid.overlaps:
        for group in dict.fromkeys(step0_group(m) for m in grid.methods if m != JOINT):
            name = f"step0-{group}"
            checkpoints, logs = run_paths(out, STEP0_TASK, overlap, name)
            method = "FT" if group == "shared" else group
            args = ["--task", STEP0_TASK, "--step", "0", "--name", name, *method_flags(method)]
            if group == "shared":
                args += estimate_flags(grid.methods)
            if overlap:
                args.append("--overlap")
            grid.jobs.append(Job(f"step 0 {group} {setting_name(STEP0_TASK, overlap)}", args,
                                 logs / "step0.json", step_work(STEP0_TASK, 0)))
            step0_of[(overlap, group)] = (checkpoints / "step0.pth", logs / "step0.json")
    for task in grid.tasks:
        last = tasks.num_steps(DATASET, task) - 1
        for overlap in grid.overlaps:
            for method in grid.methods:
                if method == JOINT:
                    continue
                _, logs = run_paths(out, task, overlap, method)
                step0, step0_results = step0_of[(overlap, step0_group(method))]
                args = ["--task", task, "--step", "all", "--name", method, *method_flags(method)]
                if overlap:
                    args.append("--overlap")
                work = sum(step_work(task, step) for step in range(1, last + 1))
                grid.jobs.append(Job(f"{method} {setting_name(task, overlap)}", args, logs / f"step{last}.json",
                                     work, link_step0=step0, step0_results=step0_results))
    if JOINT in grid.methods:
        _, logs = run_paths(out, "offline", False, JOINT)
        grid.jobs.append(Job("Joint (offline)", ["--task", "offline", "--step", "0", "--name", JOINT,
                                                "--method", "FT"], logs / "step0.json",
                             step_work("offline", 0)))


def link_step0(job: Job, out: Path) -> None:
    """Make the shared step-0 checkpoint and results this run's own, so train.py skips step 0."""
    task = job.args[job.args.index("--task") + 1]
    overlap = "--overlap" in job.args
    name = job.args[job.args.index("--name") + 1]
    checkpoints, logs = run_paths(out, task, overlap, name)
    checkpoints.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    target = checkpoints / "step0.pth"
    if not target.exists():
        os.symlink(os.path.relpath(job.link_step0, checkpoints), target)
    if not (logs / "step0.json").exists():
        shutil.copyfile(job.step0_results, logs / "step0.json")


def command(job: Job, grid: Grid, nproc: int) -> List[str]:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, str(REPO_ROOT / "train.py"), "--dataset", DATASET, *grid.common,
            "--checkpoint_dir", str(grid.out / "checkpoints"), "--logdir", str(grid.out / "logs"), *job.args]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def next_job(pending: Sequence[Job]) -> Optional[Job]:
    """The costliest pending job whose step-0 model is finished (the longest runs start first, so
    that no short run is left alone at the end), or None when every pending job still waits."""
    ready = [job for job in pending if job.step0_results is None or job.step0_results.is_file()]
    return max(ready, key=lambda job: job.work, default=None)


def run_grid(grid: Grid, nproc: int, jobs: int, threads: int) -> float:
    """Run the unfinished jobs, ``jobs`` at a time; returns the wall time of the grid over every
    invocation (kept in ``<out>/timings.json`` with each run's own wall time)."""
    timings_path = grid.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {"runs": {}, "wall": 0.0}
    earlier_wall = timings["wall"]
    pending = [job for job in grid.jobs if not job.results.is_file()]
    to_run, total_work = len(pending), sum(job.work for job in pending)
    print(f"{len(grid.jobs)} runs, {len(grid.jobs) - to_run} already finished, {to_run} to go "
          f"({jobs} at a time, {threads} thread(s) each)", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.monotonic()
    running: Dict[subprocess.Popen, tuple] = {}  # process -> (job, start time, log handle)
    done, work_done = 0, 0

    def save_timings() -> None:
        timings["wall"] = earlier_wall + time.monotonic() - start
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=1))

    try:
        while pending or running:
            while len(running) < jobs:
                job = next_job(pending)
                if job is None:
                    break
                pending.remove(job)
                if job.link_step0 is not None:
                    link_step0(job, grid.out)
                cmd = command(job, grid, nproc)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                handle = open(job.log, "a")
                handle.write(f"\n$ {shlex.join(cmd)}\n")
                handle.flush()
                process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
                running[process] = (job, time.monotonic(), handle)
            if not running:
                raise SystemExit(f"runs {[job.label for job in pending]} wait for step-0 models that no run makes")
            finished = _wait_any(running)
            job, began, handle = running.pop(finished)
            handle.close()
            if finished.returncode != 0:
                raise SystemExit(f"run '{job.label}' failed with exit code {finished.returncode}; see {job.log}. "
                                 "Rerun the same command to continue.")
            seconds = time.monotonic() - began
            timings["runs"][job.label] = seconds
            save_timings()
            done += 1
            work_done += job.work
            elapsed = time.monotonic() - start
            eta = elapsed / work_done * (total_work - work_done)
            print(f"[{done}/{to_run}] {job.label}: {seconds:.0f} s | elapsed "
                  f"{_duration(elapsed)} | ETA {_duration(eta)}", flush=True)
    finally:
        # Interrupted or failed: stop the other runs the way a scheduler would (they write an
        # in-step checkpoint and exit), so that a rerun resumes them.
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            process.wait()
        save_timings()
    return timings["wall"]


def _wait_any(running: Dict[subprocess.Popen, tuple]) -> subprocess.Popen:
    while True:
        for process in running:
            if process.poll() is not None:
                return process
        time.sleep(0.5)


# ------------------------------------------------------------------ results
def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    valid = [value for value in values if value is not None]
    return sum(valid) / len(valid) if valid else None


def group_scores(result: dict, base_task: str) -> Dict[str, Optional[float]]:
    """Old / new / all mIoU of a results file, grouped by the labels of ``base_task``'s step 0.

    Grouping by label (not by channel) makes Joint (the offline task, one step) comparable with
    the incremental runs. ``*_fg`` leave the background out (the MiB paper's convention).
    """
    old_labels = set(tasks.labels_of_step(DATASET, base_task, 0))
    by_label = dict(zip(result["channel_order"], result["class_iou"]))
    old = [iou for label, iou in by_label.items() if label in old_labels]
    new = [iou for label, iou in by_label.items() if label not in old_labels]
    old_fg = [iou for label, iou in by_label.items() if label in old_labels and label != 0]
    return {"old": _mean(old), "new": _mean(new), "all": _mean(old + new),
            "old_fg": _mean(old_fg), "new_fg": _mean(new), "all_fg": _mean(old_fg + new)}


def load_results(grid: Grid) -> Dict[str, Dict[tuple, List[dict]]]:
    """Per method, per (task, overlap): the results of every step found, in step order."""
    found: Dict[str, Dict[tuple, List[dict]]] = {}
    for method in grid.methods:
        for task in grid.tasks:
            for overlap in grid.overlaps:
                if method == JOINT:
                    _, logs = run_paths(grid.out, "offline", False, JOINT)
                    steps = [logs / "step0.json"]
                else:
                    _, logs = run_paths(grid.out, task, overlap, method)
                    steps = [logs / f"step{t}.json" for t in range(tasks.num_steps(DATASET, task))]
                results = [json.loads(path.read_text()) for path in steps if path.is_file()]
                found.setdefault(method, {})[(task, overlap)] = results
    return found


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _markdown(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(grid: Grid, results, foreground: bool) -> str:
    suffix = "_fg" if foreground else ""
    header = ["method"]
    for task, overlap in grid.settings:
        name = f"{task} {'ov.' if overlap else 'disj.'}"
        first_new = len(tasks.labels_of_step(DATASET, task, 0))
        old = f"{1 if foreground else 0}-{first_new - 1}"
        header += [f"{name} {old}", f"{first_new}-20", "all"]
    rows = []
    for method in grid.methods:
        row = [REGISTRY[method].paper_row if method in REGISTRY else method]
        for task, overlap in grid.settings:
            runs = results[method][(task, overlap)]
            final = method == JOINT or len(runs) == tasks.num_steps(DATASET, task)
            if not runs or not final:
                row += ["–", "–", "–"]
                continue
            scores = group_scores(runs[-1], task)
            row += [_percent(scores[f"{key}{suffix}"]) for key in ("old", "new", "all")]
        rows.append(row)
    return _markdown(header, rows)


def retention_table(grid: Grid, results) -> str:
    """Old classes' mIoU after the last step as a percentage of their mIoU after the run's own step 0
    (foreground only): forgetting, apart from how good the step-0 model was."""
    header = ["method"] + [f"{task} {'ov.' if overlap else 'disj.'}" for task, overlap in grid.settings]
    rows = []
    for method in grid.methods:
        if method == JOINT:
            continue
        row = [REGISTRY[method].paper_row]
        for task, overlap in grid.settings:
            runs = results[method][(task, overlap)]
            if len(runs) < tasks.num_steps(DATASET, task):
                row.append("–")
                continue
            first, last = group_scores(runs[0], task)["old_fg"], group_scores(runs[-1], task)["old_fg"]
            row.append(f"{100 * last / first:.0f}% of {_percent(first)}" if first else "–")
        rows.append(row)
    return _markdown(header, rows)


def plot(grid: Grid, results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = grid.settings
    figure, axes = plt.subplots(len(settings), 3, figsize=(13, 3.2 * len(settings)), squeeze=False)
    for row, (task, overlap) in enumerate(settings):
        steps = tasks.num_steps(DATASET, task)
        for column, group in enumerate(("old", "new", "all")):
            axis = axes[row][column]
            for method in grid.methods:
                runs = results[method][(task, overlap)]
                if not runs:
                    continue
                label = REGISTRY[method].paper_row if method in REGISTRY else method
                if method == JOINT:
                    value = group_scores(runs[0], task)[f"{group}_fg"]
                    if value is not None:
                        axis.axhline(100 * value, linestyle="--", color="black", label=label)
                    continue
                values = [group_scores(result, task)[f"{group}_fg"] for result in runs]
                points = [(t, 100 * v) for t, v in enumerate(values) if v is not None]
                if points:
                    axis.plot(*zip(*points), marker="o", label=label)
            axis.set_xticks(range(steps))
            axis.set_ylim(0, 100)
            axis.set_title(f"{task} {'overlapped' if overlap else 'disjoint'}: {group} classes (no bg)")
            axis.set_xlabel("after step")
            axis.set_ylabel("mIoU (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(labels))
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.25 / len(settings)))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(grid: Grid, results, argv: List[str], wall: float, path: Path) -> None:
    lines = [
        "# Method benchmark on the synthetic dataset",
        "",
        "Command (from the repository root):",
        "",
        "```",
        "python launch/benchmark_methods.py " + shlex.join(argv),
        "```",
        "",
        f"Wall time of the grid: {_duration(wall)}. Options of every run: `{shlex.join(grid.common)}`.",
        "",
        "mIoU (%) after the last step. Foreground only (the MiB paper's convention, Table 1):",
        "",
        markdown_table(grid, results, foreground=True),
        "",
        "With the background counted among the old classes and in all (PLOP's convention):",
        "",
        markdown_table(grid, results, foreground=False),
        "",
        "Old classes kept: their mIoU after the last step as a share of their mIoU after the run's own step 0 "
        "(foreground only; LwF-MC's and PLOP's step 0 are their own, every other method's the shared one):",
        "",
        retention_table(grid, results),
        "",
        f"![mIoU after each step]({path.with_suffix('.png').name})",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmark", help="checkpoints, logs and the report go here")
    parser.add_argument("--data_root", default="data", help="holds (or receives) SyntheticVOC/")
    parser.add_argument("--methods", default=",".join([*REGISTRY, JOINT]),
                        help="comma list of methods (registry names) and Joint")
    parser.add_argument("--tasks", default="15-5,15-1", help="comma list of synthetic VOC tasks")
    parser.add_argument("--settings", default="disjoint,overlap", help="disjoint, overlap or both")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run (torchrun when > 1); on a 2-core CPU one process with "
                             "two threads is faster than two processes")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at once; on a 2-core CPU two runs of one thread each take about the time "
                             "of one run with two threads")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per process (OMP_NUM_THREADS); default: the CPU count divided by "
                             "jobs x nproc, at least 1")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--crop_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8, help="per process")
    parser.add_argument("--norm_act", default="abn",
                        help="abn: the same function as In-Place ABN, computed by PyTorch's fused batch norm, "
                             "which is faster on CPU")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="DataLoader workers per run; on a 2-core CPU loading in the training process is "
                             "faster (workers compete with the two compute threads)")
    parser.add_argument("--epochs", type=int, default=6,
                        help="per step; the default grid takes about 50 min on 2 cores "
                             "(docs/results-synthetic.md)")
    parser.add_argument("--lr", type=float, default=0.02, help="step 0")
    parser.add_argument("--incremental_lr", type=float, default=0.001,
                        help="steps after step 0: the protocol's value. EWC's and PI's penalty (weight 500 "
                             "on importances below 1) is unstable above 0.00136 under SGD with Nesterov "
                             "momentum 0.9, and diverges at 0.002 on this grid")
    parser.add_argument("--extra", default="", help="more train.py options, one quoted string")
    args = parser.parse_args(argv)

    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    unknown = [method for method in methods if method not in REGISTRY and method != JOINT]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; available: {', '.join([*REGISTRY, JOINT])}")
    if args.jobs < 1 or args.nproc < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs, --nproc and --threads must be at least 1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc))
    settings = [s.strip() for s in args.settings.split(",")]
    if not set(settings) <= {"disjoint", "overlap"}:
        parser.error(f"--settings {args.settings}: use disjoint, overlap or both")
    task_list = [task.strip() for task in args.tasks.split(",")]
    for task in task_list:
        if tasks.labels_of_step(DATASET, task, 0) != tasks.labels_of_step(DATASET, STEP0_TASK, 0):
            parser.error(f"--tasks: {task} does not start from the 15-class step 0 of {STEP0_TASK}")
    common = ["--data_root", args.data_root, "--backbone", args.backbone, "--norm_act", args.norm_act,
              "--crop_size", str(args.crop_size), "--num_workers", str(args.num_workers),
              "--batch_size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr),
              "--incremental_lr", str(args.incremental_lr), "--val_interval", str(args.epochs),
              "--no-visualize", *shlex.split(args.extra)]
    out = Path(args.out).resolve()
    grid = Grid(methods, task_list, [setting == "overlap" for setting in settings], common, out)
    build_grid(grid)
    # Made here, once: concurrent runs would otherwise all start writing it.
    ensure_synthetic_voc(args.data_root)
    wall = run_grid(grid, args.nproc, args.jobs, threads)
    results = load_results(grid)
    report = out / "results.md"
    plot(grid, results, report.with_suffix(".png"))
    write_report(grid, results, argv, wall, report)
    print(f"table: {report}\nplot: {report.with_suffix('.png')}")


if __name__ == "__main__":
    main()
