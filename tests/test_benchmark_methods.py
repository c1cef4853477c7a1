"""launch/benchmark_methods.py on a tiny grid: runs, shares step 0, skips finished runs, writes table and plot."""
import os
import re
import subprocess
import sys

import pytest

from train_cli_worker import REPO_ROOT, synthetic_root

SCRIPT = os.path.join(REPO_ROOT, "launch", "benchmark_methods.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic_root(tmp_path_factory)


def _run(data_root, out):
    command = [sys.executable, SCRIPT, "--out", str(out), "--data_root", data_root, "--methods", "FT,MiB,Joint",
               "--tasks", "15-5", "--settings", "disjoint", "--nproc", "1", "--epochs", "1", "--crop_size", "32",
               "--extra", "--num_workers 0 --device cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_tiny_grid_writes_table_and_plot_and_restarts_without_training(data_root, tmp_path):
    pytest.importorskip("matplotlib")
    first = _run(data_root, tmp_path)
    # FT and MiB share one step-0 model: 4 runs (shared step 0, FT, MiB, Joint).
    assert "4 runs, 0 already finished, 4 to go" in first and "ETA" in first
    checkpoints = tmp_path / "checkpoints" / "synthetic-15-5"
    assert os.path.realpath(checkpoints / "FT" / "step0.pth") == str(checkpoints / "step0-shared" / "step0.pth")
    assert (checkpoints / "MiB" / "step0.pth").is_symlink()

    report = (tmp_path / "results.md").read_text()
    for method in ("FT", "MiB", "Joint"):
        rows = re.findall(rf"^\| {method} \|(.*)\|$", report, re.M)
        assert len(rows) == 2, method  # both background conventions
        for row in rows:
            assert all(re.fullmatch(r"\d+\.\d", cell.strip()) for cell in row.split("|"))
    assert "15-5 disj. 1-15" in report and "15-5 disj. 0-15" in report
    assert (tmp_path / "results.png").stat().st_size > 0

    second = _run(data_root, tmp_path)
    assert "4 runs, 4 already finished, 0 to go" in second
