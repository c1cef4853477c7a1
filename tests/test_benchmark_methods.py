"""launch/benchmark_methods.py on a tiny grid: runs, shares step 0, skips finished runs, writes table and plot."""
import os
import re
import subprocess
import sys

import pytest

from segmentation.engine.checkpoint import load_checkpoint
from train_cli_worker import REPO_ROOT, synthetic_root

SCRIPT = os.path.join(REPO_ROOT, "launch", "benchmark_methods.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic_root(tmp_path_factory)


def _run(data_root, out):
    command = [sys.executable, SCRIPT, "--out", str(out), "--data_root", data_root, "--methods", "FT,EWC,MiB,Joint",
               "--tasks", "15-5", "--settings", "disjoint", "--nproc", "1", "--epochs", "1", "--crop_size", "32",
               "--extra", "--device cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_tiny_grid_writes_table_and_plot_and_restarts_without_training(data_root, tmp_path):
    pytest.importorskip("matplotlib")
    first = _run(data_root, tmp_path)
    # FT, EWC and MiB share one step-0 model, which estimates EWC's Fisher on the way:
    # 5 runs (shared step 0, FT, EWC, MiB, Joint).
    assert "5 runs, 0 already finished, 5 to go" in first and "ETA" in first
    checkpoints = tmp_path / "checkpoints" / "synthetic-15-5"
    shared = checkpoints / "step0-shared" / "step0.pth"
    for method in ("FT", "EWC", "MiB"):
        assert os.path.realpath(checkpoints / method / "step0.pth") == str(shared)
    assert set(load_checkpoint(shared)["regularizers"]) == {"ewc"}
    assert set(load_checkpoint(checkpoints / "EWC" / "step1.pth")["regularizers"]) == {"ewc"}

    report = (tmp_path / "results.md").read_text()
    for method in ("FT", "EWC", "MiB", "Joint"):
        rows = re.findall(rf"^\| {method} \|(.*)\|$", report, re.M)
        assert len(rows) == 2, method  # both background conventions
        for row in rows:
            assert all(re.fullmatch(r"\d+\.\d", cell.strip()) for cell in row.split("|"))
    assert "15-5 disj. 1-15" in report and "15-5 disj. 0-15" in report
    assert (tmp_path / "results.png").stat().st_size > 0

    second = _run(data_root, tmp_path)
    assert "5 runs, 5 already finished, 0 to go" in second
