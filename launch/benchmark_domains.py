"""Benchmark the methods on a domain-incremental task of the synthetic Cityscapes-like set.

    python launch/benchmark_domains.py --out benchmark-domains [--task 11-5] [--methods FT,MiB,PLOP]

Trains step 0 once with plain cross-entropy (every method's step 0 on a domain task) and links it
into each method's run folder, then runs the later steps of each method, and Joint (the
``offline`` task: every city in one step), through the normal ``train.py`` command, two runs at a
time (step 0 and Joint 30 epochs at LR 0.02, the later steps 15 at 0.005 by default). Writes ``<out>/results.md``: the commands, the wall time and the table of
``launch/summarize.py`` (mIoU of the 19 classes on the test images of the old cities, the last
step's cities and all, after the last step). Finished runs are skipped, so the script can be
stopped and restarted.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET = "synthetic_domain"
METHODS = ("FT", "LWF", "ILT", "MiB", "PLOP")
JOINT = "Joint"


def _train_command(args: argparse.Namespace, task: str, name: str, steps: List[str], lr: float,
                   epochs: int) -> List[str]:
    return [sys.executable, str(REPO_ROOT / "train.py"), "--dataset", DATASET, "--data_root", args.data_root,
            "--task", task, "--step", *steps, "--name", name, "--backbone", args.backbone,
            "--crop_size", str(args.crop_size), "--batch_size", str(args.batch_size), "--epochs", str(epochs),
            "--lr", str(lr), "--num_workers", "0", "--device", "cpu", "--print_interval", "1000", "--no-visualize",
            "--checkpoint_dir", str(Path(args.out) / "checkpoints"), "--logdir", str(Path(args.out) / "logs"),
            *shlex.split(args.extra)]


def _results(args: argparse.Namespace, task: str, name: str, step: int) -> Path:
    return Path(args.out) / "logs" / f"{DATASET}-{task}" / name / f"step{step}.json"


def _run_all(commands: List[List[str]], jobs: int, log: Path) -> None:
    """Run ``commands`` ``jobs`` at a time (one thread each); stop at the first failure."""
    pending, running = list(commands), []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with log.open("a") as handle:
        while pending or running:
            while pending and len(running) < jobs:
                command = pending.pop(0)
                handle.write("+ " + shlex.join(command) + "\n")
                handle.flush()
                running.append((command, subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                                          env=env, cwd=REPO_ROOT)))
            time.sleep(1)
            for command, process in list(running):
                if process.poll() is not None:
                    running.remove((command, process))
                    if process.returncode != 0:
                        raise SystemExit(f"failed ({process.returncode}): {shlex.join(command)}; see {log}")
                    print(f"done: {' '.join(command[command.index('--name') + 1:][:1])}", flush=True)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmark-domains", help="checkpoints, logs and the report go here")
    parser.add_argument("--data_root", default="data", help="holds (or receives) SyntheticCityscapes/")
    parser.add_argument("--task", default="11-5", help="11-5, 11-1 or 1-1")
    parser.add_argument("--methods", default=",".join([*METHODS, JOINT]), help="comma list")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--crop_size", type=int, default=64, help="at least 64: Local POD's 4x4 grid at stride 16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--step0_epochs", type=int, default=30, help="step 0 and Joint")
    parser.add_argument("--epochs", type=int, default=15, help="each later step")
    parser.add_argument("--lr", type=float, default=0.02, help="step 0 and Joint")
    parser.add_argument("--incremental_lr", type=float, default=0.005, help="the later steps")
    parser.add_argument("--extra", default="", help="more train.py options, one quoted string")
    args = parser.parse_args(argv)
    methods = [name for name in args.methods.split(",") if name]
    unknown = sorted(set(methods) - {*METHODS, JOINT})
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join([*METHODS, JOINT])}")
    sys.path.insert(0, str(REPO_ROOT))
    from segmentation import tasks

    last = tasks.num_steps(DATASET, args.task) - 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "console.log"
    started = time.time()
    shared = out / "checkpoints" / f"{DATASET}-{args.task}" / "step0-shared" / "step0.pth"
    if not shared.exists():
        _run_all([_train_command(args, args.task, "step0-shared", ["0"], args.lr, args.step0_epochs)], 1, log)
    commands = []
    for method in methods:
        if method == JOINT:
            if not _results(args, "offline", JOINT, 0).exists():
                commands.append(_train_command(args, "offline", JOINT, ["0"], args.lr, args.step0_epochs))
            continue
        if _results(args, args.task, method, last).exists():
            continue
        folder = shared.parent.parent / method
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "step0.pth").exists():
            os.symlink(os.path.relpath(shared, folder), folder / "step0.pth")
        steps = [str(step) for step in range(1, last + 1)]
        commands.append([*_train_command(args, args.task, method, steps, args.incremental_lr, args.epochs),
                         "--method", method])
    _run_all(commands, args.jobs, log)
    summary = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "summarize.py"), str(out / "logs")],
                             capture_output=True, text=True, check=True).stdout
    report = (f"# Domain-incremental benchmark: {DATASET} {args.task}\n\n"
              f"{len(commands)} runs in {time.time() - started:.0f} s; commands in {log}\n\n{summary}")
    (out / "results.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
