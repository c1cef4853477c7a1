"""Smoke tests of the CPU benchmark scripts launch/bench_data.py and launch/bench_norm_memory.py."""
import importlib.util
import json
import os
import re
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_script(name: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "launch", name), *args],
        check=True, capture_output=True, text=True, env=ENV, timeout=600,
    ).stdout


def test_bench_data_times_dataloader_workers(tmp_path):
    # The step rate to feed: the fastest step-0 rate of our model that bench_train.py measured.
    rows = [{"model": "ours", "step": 0, "images_per_s": 80.0}, {"model": "ours", "step": 0, "images_per_s": 100.0},
            {"model": "ours", "step": 1, "images_per_s": 300.0}, {"model": "torchvision", "step": 0, "images_per_s": 400.0},
            {"model": "ours", "step": 0, "error": "skipped: time budget spent"}]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = run_script(
        "bench_data.py", "--num_images", "24", "--width", "80", "--height", "60", "--crop_size", "64",
        "--repeats", "1", "--workers", "0,1", "--batch_size", "4", "--loader_images", "24",
        "--step_rate_from", str(results),
    )
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \|$", out, re.MULTILINE)
    assert [workers for workers, _, _ in rows] == ["0", "1"]
    assert all(int(rate) > 0 for _, rate, _ in rows)
    assert re.search(r"cores per GPU for 100 training images/s: \d+\.\d at the single-process rate", out)


def test_bench_data_no_measured_step_rate(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_data", os.path.join(REPO_ROOT, "launch", "bench_data.py"))
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    assert bench_data.measured_step_rate(str(tmp_path / "missing.jsonl")) is None
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"model": "ours", "step": 0, "error": "skipped: time budget spent"}) + "\n")
    assert bench_data.measured_step_rate(str(results)) is None


def test_bench_norm_memory_in_place_abn_saves_less():
    out = run_script("bench_norm_memory.py", "--backbone", "resnet18", "--size", "32", "--repeats", "1")
    rows = {m[0]: (int(m[1]), float(m[2])) for m in re.findall(r"^\| (\w+) \| (\d+) \| ([\d.]+) \|", out, re.MULTILINE)}
    assert set(rows) == {"abn", "iabn"}
    # In-Place ABN keeps only its output; ABN also keeps the norm's input (and more tensors).
    assert rows["iabn"][1] < rows["abn"][1]
    assert rows["iabn"][0] < rows["abn"][0]
