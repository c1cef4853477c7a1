"""Smoke test of the training-step benchmark (launch/bench_train.py) in its CPU --quick mode, its precisions'
train.py settings, and --record."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = os.path.join(REPO_ROOT, "launch", "bench_train.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_writes_one_row_per_variant(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, SCRIPT, "--quick", "--output_dir", str(out)],
                   check=True, cwd=tmp_path, env=env, timeout=600)
    bench = load_bench()
    bench.main(["--record", str(out), "--docs", str(docs)])
    names = [variant.name for variant in bench.quick_plan()]

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in rows] == names
    for row in rows:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["flops_per_image"] > 0
        assert row["torch"] and row["date"]
    # Step 1 adds the old model's forward: more FLOPs per image than step 0.
    by_name = {row["variant"]: row for row in rows}
    assert by_name["ours-iabn/os16/fp32/nchw/step1"]["flops_per_image"] > by_name["ours-iabn/os16/fp32/nchw/step0"][
        "flops_per_image"
    ]

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "#### Training step, CPU" in text and "torch " in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "/step" in line]
    assert [line.split("|")[1].strip() for line in table] == names
    assert (out / "table.md").read_text().strip() in text


def test_failing_variant_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    bench = load_bench()
    failing = bench.Variant(precision="fp8")
    working = bench.Variant(norm="abn")
    monkeypatch.setattr(bench, "quick_plan", lambda: [failing, working])
    bench.main(["--quick", "--output_dir", str(tmp_path)])

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in rows] == [failing.name, working.name]
    assert "unknown precision 'fp8'" in rows[0]["error"] and "images_per_s" not in rows[0]
    assert rows[1]["images_per_s"] > 0 and "error" not in rows[1]
    assert "ValueError: unknown precision" in (tmp_path / "table.md").read_text()


def test_time_budget_skips_the_remaining_variants(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench, "quick_plan", lambda: [bench.Variant(norm="abn"), bench.Variant()])
    bench.main(["--quick", "--output_dir", str(tmp_path), "--time_budget", "0"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["error"] == "skipped: time budget spent" for row in rows)


def test_record_appends_the_table_with_the_variants_a_stopped_run_did_not_reach(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench, "quick_plan", lambda: [bench.Variant(norm="abn"), bench.Variant(precision="tf32")])
    out = tmp_path / "out"
    bench.main(["--quick", "--output_dir", str(out), "--time_budget", "0"])
    results = out / "results.jsonl"
    results.write_text(results.read_text().splitlines()[0] + "\n")  # as if stopped during the second variant
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    bench.main(["--record", str(out), "--docs", str(docs)])

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\n#### Training step, CPU")
    assert "fp32 = `--amp off --tf32 off`, tf32 = `--amp off --tf32 on`" in text
    notes = [line.split("|")[-2].strip() for line in text.splitlines() if "/step0 |" in line]
    assert notes == ["skipped: time budget spent", "not measured: the run stopped before it"]
    with pytest.raises(SystemExit, match="nothing to record"):
        bench.main(["--record", str(tmp_path / "empty"), "--docs", str(docs)])


def test_precisions_set_what_train_py_sets_for_their_options(monkeypatch):
    bench = load_bench()
    from segmentation.models import norm_kernels

    cpu = torch.device("cpu")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, norm_kernels.kernel_mode())
    try:
        expected = {"fp32": False, "tf32": True, "fp16": True, "bf16": True}
        for precision, tf32 in expected.items():
            bench.configure(bench.Variant(precision=precision, kernels="reference"), cpu)
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
            assert norm_kernels.kernel_mode() == "reference"
            trainer = bench.build_trainer(bench.Variant(precision=precision), "resnet18", "resnet50", cpu)
            assert trainer.amp == bench.PRECISION_OPTIONS[precision][0]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        norm_kernels.set_kernel_mode(saved[2])
