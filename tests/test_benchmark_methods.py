"""launch/benchmark_methods.py on a tiny grid: runs, shares step 0, skips finished runs, writes table and plot."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from segmentation.engine.checkpoint import load_checkpoint
from train_cli_worker import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "launch", "benchmark_methods.py")


def _script_module():
    spec = importlib.util.spec_from_file_location("benchmark_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _argv(data_root, out):
    return ["--out", str(out), "--data_root", data_root, "--methods", "EWC,MiB,Joint", "--tasks", "15-5",
            "--settings", "disjoint", "--nproc", "1", "--jobs", "2", "--threads", "1", "--epochs", "1",
            "--crop_size", "32", "--extra", "--device cpu"]


def _run(data_root, out):
    result = subprocess.run([sys.executable, SCRIPT, *_argv(data_root, out)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_tiny_grid_writes_table_and_plot_and_restarts_without_training(data_root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    first = _run(data_root, tmp_path)
    # EWC and MiB share one step-0 model, which estimates EWC's Fisher on the way: 4 runs (shared
    # step 0, EWC, MiB, Joint). (FT would share it as MiB does: the same code, one run more.)
    assert "4 runs, 0 already finished, 4 to go (2 at a time, 1 thread(s) each)" in first and "ETA" in first
    # Two at a time, each run waiting for its step 0: every run ended, each with its own log.
    logs = tmp_path / "logs" / "synthetic-15-5"
    for name in ("step0-shared", "EWC", "MiB"):
        assert "results written" in (logs / name / "console.log").read_text(), name
        assert "results written" in (logs / name / "train.log").read_text(), name
    checkpoints = tmp_path / "checkpoints" / "synthetic-15-5"
    shared = checkpoints / "step0-shared" / "step0.pth"
    for method in ("EWC", "MiB"):
        assert os.path.realpath(checkpoints / method / "step0.pth") == str(shared)
    assert set(load_checkpoint(shared)["method_states"]) == {"ewc"}
    assert set(load_checkpoint(checkpoints / "EWC" / "step1.pth")["method_states"]) == {"ewc"}

    report = (tmp_path / "results.md").read_text()
    for method in ("EWC", "MiB", "Joint"):
        rows = re.findall(rf"^\| {method} \|(.*)\|$", report, re.M)
        # Both background conventions, then (not for Joint) the share of step 0's old-class mIoU kept.
        assert len(rows) == (2 if method == "Joint" else 3), method
        for row in rows[:2]:
            assert all(re.fullmatch(r"\d+\.\d", cell.strip()) for cell in row.split("|"))
        for row in rows[2:]:  # "–" where 1 epoch of step 0 left the old classes at 0.0
            assert re.fullmatch(r"\d+% of \d+\.\d|–", row.strip()), row
    assert "15-5 disj. 1-15" in report and "15-5 disj. 0-15" in report
    assert (tmp_path / "results.png").stat().st_size > 0

    # The restart trains nothing: its main function in this process (a new interpreter adds nothing here).
    capsys.readouterr()
    _script_module().main(_argv(data_root, tmp_path))
    second = capsys.readouterr().out
    assert "4 runs, 4 already finished, 0 to go" in second and "table: " in second


def test_next_job_waits_for_step0_and_starts_the_costliest(tmp_path):
    module = _script_module()
    step0 = module.Job("step 0", [], tmp_path / "step0.json", work=16)
    short = module.Job("15-5", [], tmp_path / "a.json", work=6, step0_results=step0.results)
    long = module.Job("15-1", [], tmp_path / "b.json", work=10, step0_results=step0.results)
    joint = module.Job("Joint", [], tmp_path / "c.json", work=21)
    assert module.next_job([short, long, step0, joint]) is joint
    assert module.next_job([short, long, step0]) is step0
    assert module.next_job([short, long]) is None  # step 0 still running
    step0.results.write_text("{}")
    assert module.next_job([short, long]) is long
    assert module.next_job([]) is None


def test_retention_is_the_last_steps_old_miou_over_step0s(tmp_path):
    module = _script_module()
    grid = module.Grid(["MiB"], ["15-5"], [False], [], tmp_path)
    step0 = {"channel_order": list(range(16)), "class_iou": [0.9] + [0.4] * 15}
    step1 = {"channel_order": list(range(21)), "class_iou": [0.8] + [0.1] * 15 + [0.5] * 5}
    table = module.retention_table(grid, {"MiB": {("15-5", False): [step0, step1]}})
    assert table.splitlines()[-1] == "| MiB | 25% of 40.0 |"
    unfinished = module.retention_table(grid, {"MiB": {("15-5", False): [step0]}})
    assert unfinished.splitlines()[-1] == "| MiB | – |"


def test_a_failed_run_stops_the_others_and_keeps_the_wall_time(tmp_path, monkeypatch):
    module = _script_module()
    stopped = tmp_path / "stopped"
    # The long run records the SIGTERM it gets (train.py writes an in-step checkpoint then).
    sleeper = ("import signal, sys, time, pathlib\n"
               f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(stopped)!r}).touch(), sys.exit(3)))\n"
               "time.sleep(120)\n")
    programs = {"long": ["-c", sleeper], "bad": ["-c", "import time; time.sleep(3); raise SystemExit(5)"]}
    monkeypatch.setattr(module, "command", lambda job, grid, nproc: [sys.executable, *programs[job.label]])
    grid = module.Grid([], [], [], [], tmp_path)
    grid.jobs = [module.Job("long", [], tmp_path / "long" / "r.json", work=2),
                 module.Job("bad", [], tmp_path / "bad" / "r.json", work=1)]
    with pytest.raises(SystemExit, match="run 'bad' failed with exit code 5; see .*bad/console.log"):
        module.run_grid(grid, nproc=1, jobs=2, threads=1)
    assert stopped.is_file()
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["runs"] == {} and timings["wall"] > 0
