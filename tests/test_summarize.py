import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from train_cli_worker import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "launch", "summarize.py")


def _load_module():
    spec = importlib.util.spec_from_file_location("summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = _load_module()


def _write_step(logdir, dataset, task, overlap, name, method, step, num_steps, base):
    """A results file like the training run writes; mIoU values derived from ``base`` and ``step``."""
    folder = logdir / (f"{dataset}-{task}" + ("-ov" if overlap else "")) / name
    folder.mkdir(parents=True, exist_ok=True)
    result = {"dataset": dataset, "task": task, "overlap": overlap, "step": step, "num_steps": num_steps,
              "method": method, "name": name, "channel_order": [], "class_names": [], "class_iou": [],
              "options": {}, "overall_acc": 0.9, "mean_acc": 0.8, "hmean": 0.3, "hmean_fg": 0.25,
              "train_seconds": 1.0, "train_images_per_second": 2.0}
    for offset, key in enumerate(("miou_old", "miou_new", "miou_all", "miou_old_fg", "miou_new_fg",
                                  "miou_all_fg")):
        result[key] = base + step / 10 + offset / 100
    (folder / f"step{step}.json").write_text(json.dumps(result))
    return result


@pytest.fixture
def logdir(tmp_path):
    runs = {}
    for step in range(2):
        runs["mib"] = _write_step(tmp_path, "voc", "15-5", False, "MiB", "MiB", step, 2, 0.5)
        runs["mib_ov"] = _write_step(tmp_path, "voc", "15-5", True, "MiB", "MiB", step, 2, 0.4)
        runs["ft"] = _write_step(tmp_path, "voc", "15-5", False, "ft-run", "FT", step, 2, 0.1)
    for step in range(3):  # an unfinished 15-1 run (6 steps)
        runs["mib_15_1"] = _write_step(tmp_path, "voc", "15-1", False, "MiB", "MiB", step, 6, 0.2)
    (tmp_path / "voc-15-1" / "MiB" / "step3.json").write_text("{not json")  # a broken newer file
    (tmp_path / "voc-15-1" / "MiB" / "results.json").write_text("[]")  # not a step file
    return tmp_path, runs


def _parse_markdown(text):
    """{title: {row: {column: cell}}} of the Markdown tables."""
    tables, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
            tables[title] = {}
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                tables[title][cells[0]] = dict(zip(header[1:], cells[1:]))
    return tables


def _pct(value):
    return f"{100 * value:.1f}"


def test_markdown_tables(logdir, capsys):
    folder, runs = logdir
    results = summarize.load_results(folder)
    assert "step3.json" in capsys.readouterr().err  # the broken file is reported and skipped
    assert len(results) == 4
    text = summarize.markdown_tables(results)
    tables = _parse_markdown(text)
    assert list(tables) == ["mIoU (%), with background", "mIoU (%), foreground only"]
    with_bg, fg = tables.values()
    assert sorted(with_bg) == ["FT/ft-run", "MiB/MiB"]
    mib, ft = with_bg["MiB/MiB"], with_bg["FT/ft-run"]
    assert list(mib) == ["voc 15-1: old", "voc 15-1: new", "voc 15-1: all", "voc 15-5: old", "voc 15-5: new",
                         "voc 15-5: all", "voc 15-5 ov: old", "voc 15-5 ov: new", "voc 15-5 ov: all"]
    # The last step of each run is shown (step 1 of 15-5, step 2 of the unfinished 15-1, marked *).
    assert mib["voc 15-5: old"] == _pct(runs["mib"]["miou_old"])
    assert mib["voc 15-5: all"] == _pct(runs["mib"]["miou_all"])
    assert mib["voc 15-5 ov: new"] == _pct(runs["mib_ov"]["miou_new"])
    assert mib["voc 15-1: new"] == _pct(runs["mib_15_1"]["miou_new"]) + "*"
    assert ft["voc 15-5: new"] == _pct(runs["ft"]["miou_new"]) and ft["voc 15-1: old"] == ""
    assert fg["MiB/MiB"]["voc 15-5: old"] == _pct(runs["mib"]["miou_old_fg"])
    assert fg["FT/ft-run"]["voc 15-5: all"] == _pct(runs["ft"]["miou_all_fg"])
    assert "unfinished run" in text


def test_csv(logdir):
    folder, runs = logdir
    rows = list(csv.DictReader(io.StringIO(summarize.csv_text(summarize.load_results(folder)))))
    assert [(row["method"], row["task"], row["overlap"]) for row in rows] == [
        ("FT", "15-5", "False"), ("MiB", "15-1", "False"), ("MiB", "15-5", "False"), ("MiB", "15-5", "True")]
    assert float(rows[1]["miou_new_fg"]) == pytest.approx(runs["mib_15_1"]["miou_new_fg"])
    assert rows[1]["step"] == "2" and rows[1]["num_steps"] == "6"
    assert rows[3]["file"].endswith(os.path.join("voc-15-5-ov", "MiB", "step1.json"))


def test_missing_values_are_shown_as_dashes(tmp_path):
    result = _write_step(tmp_path, "ade", "100-50", False, "x", None, 0, 2, 0.3)
    result["miou_new"] = None
    text = summarize.markdown_tables([result])
    row = _parse_markdown(text)["mIoU (%), with background"]["-/x"]
    assert row["ade 100-50: new"] == "-*"


def test_command_line(logdir, tmp_path_factory):
    folder, _ = logdir
    run = lambda *args: subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    markdown = run(str(folder))
    assert markdown.returncode == 0 and "| MiB/MiB |" in markdown.stdout
    as_csv = run(str(folder), "--csv")
    assert as_csv.returncode == 0 and as_csv.stdout.startswith("method,name,dataset")
    empty = run(str(tmp_path_factory.mktemp("empty")))
    assert empty.returncode == 1 and "no step" in empty.stderr
    missing = run(str(folder / "nowhere"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr
