import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from train_cli_worker import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "launch", "summarize.py")


def _load_module():
    spec = importlib.util.spec_from_file_location("summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = _load_module()


def _write_step(logdir, dataset, task, overlap, name, method, step, num_steps, base):
    """A results file like the training run writes; mIoU values derived from ``base`` and ``step``, ``new``
    null at step 0."""
    folder = logdir / (f"{dataset}-{task}" + ("-ov" if overlap else "")) / name
    folder.mkdir(parents=True, exist_ok=True)
    result = {"dataset": dataset, "task": task, "overlap": overlap, "step": step, "num_steps": num_steps,
              "method": method, "name": name, "channel_order": [], "class_names": [], "class_iou": [],
              "options": {}, "overall_acc": 0.9, "mean_acc": 0.8, "hmean": 0.3, "hmean_fg": 0.25,
              "train_seconds": 1.0, "train_images_per_second": 2.0}
    for offset, key in enumerate(("miou_old", "miou_new", "miou_all", "miou_old_fg", "miou_new_fg",
                                  "miou_all_fg")):
        result[key] = base + step / 10 + offset / 100
    if step == 0:
        result["miou_new"] = result["miou_new_fg"] = None
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


@pytest.fixture
def plot_logdir(tmp_path):
    """voc 10-5-5 (3 steps): MiB finished, FT stopped after step 1; voc 10-5-5 ov: MiB at step 0 only."""
    folder = tmp_path / "logs"
    runs = {"mib": [], "ft": [], "mib_ov": []}
    for step in range(3):
        runs["mib"].append(_write_step(folder, "voc", "10-5-5", False, "MiB", "MiB", step, 3, 0.5))
    for step in range(2):
        runs["ft"].append(_write_step(folder, "voc", "10-5-5", False, "ft-run", "FT", step, 3, 0.1))
    runs["mib_ov"].append(_write_step(folder, "voc", "10-5-5", True, "MiB", "MiB", 0, 3, 0.4))
    return folder, runs


def test_plot_draws_every_step_of_every_run(plot_logdir, tmp_path):
    folder, runs = plot_logdir
    out = tmp_path / "plots" / "miou.png"  # the missing folder is created
    figure = summarize.plot_runs(summarize.load_runs(folder), out)
    assert figure.get_suptitle() == "mIoU per step, with background"
    axes = {axis.get_title(): axis for axis in figure.axes}
    assert list(axes) == ["voc 10-5-5", "voc 10-5-5 ov"]
    lines = {line.get_label(): line for line in axes["voc 10-5-5"].get_lines()}
    # x: the steps found (step 0 has no new value); y: the JSON's with-background values in percent.
    expected_steps = {("MiB/MiB", "mib"): {"old": [0, 1, 2], "new": [1, 2], "all": [0, 1, 2]},
                      ("FT/ft-run", "ft"): {"old": [0, 1], "new": [1], "all": [0, 1]}}
    assert sorted(lines) == sorted(f"{row} {quantity}" for row, _ in expected_steps
                                   for quantity in ("old", "new", "all"))
    for (row, run), by_quantity in expected_steps.items():
        for quantity, steps in by_quantity.items():
            line = lines[f"{row} {quantity}"]
            assert list(line.get_xdata()) == steps
            values = [100 * runs[run][step][f"miou_{quantity}"] for step in steps]
            assert list(line.get_ydata()) == pytest.approx(values)
            assert line.get_marker() != "None"
    # One colour per run, one line style per quantity.
    assert {lines[f"MiB/MiB {q}"].get_color() for q in ("old", "new", "all")} == {lines["MiB/MiB old"].get_color()}
    assert lines["MiB/MiB old"].get_color() != lines["FT/ft-run old"].get_color()
    assert len({lines[f"MiB/MiB {q}"].get_linestyle() for q in ("old", "new", "all")}) == 3
    assert lines["MiB/MiB new"].get_linestyle() == lines["FT/ft-run new"].get_linestyle()
    ov_lines = {line.get_label(): line for line in axes["voc 10-5-5 ov"].get_lines()}
    assert sorted(ov_lines) == ["MiB/MiB all", "MiB/MiB old"]  # step 0 only: no new value, no new line
    assert list(ov_lines["MiB/MiB all"].get_ydata()) == pytest.approx([100 * runs["mib_ov"][0]["miou_all"]])
    for axis in axes.values():
        assert axis.get_xlabel() == "step" and axis.get_ylabel() == "mIoU (%)"
        assert axis.get_xlim() == (-0.25, 2.25)  # the whole task, also for unfinished runs
        assert all(float(tick).is_integer() for tick in axis.get_xticks())
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["FT/ft-run", "MiB/MiB", "old", "new", "all"]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        image.verify()
    assert out.stat().st_size > 0
    assert list(out.parent.iterdir()) == [out]  # no temporary file left


def test_plot_command_line(plot_logdir, tmp_path, capsys):
    folder, _ = plot_logdir
    out = tmp_path / "miou.png"
    assert summarize.main([str(folder), "--plot", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| MiB/MiB |" in captured.out  # the tables are still printed
    assert captured.err == f"plot written to {out}\n"
    with Image.open(out) as image:
        assert image.format == "PNG"
    assert summarize.main([str(folder), "--csv", "--plot", str(out)]) == 0
    assert capsys.readouterr().out.startswith("method,name,dataset")  # stdout stays plain CSV


def test_tables_do_not_import_matplotlib(plot_logdir):
    folder, _ = plot_logdir
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('summarize', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "assert module.main([sys.argv[2]]) == 0; assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    run = subprocess.run([sys.executable, "-c", code, SCRIPT, str(folder)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_plot_errors(plot_logdir, tmp_path, capsys):
    folder, _ = plot_logdir
    empty = tmp_path / "empty"
    empty.mkdir()
    assert summarize.main([str(empty), "--plot", str(tmp_path / "miou.png")]) == 1
    assert "no step" in capsys.readouterr().err and not (tmp_path / "miou.png").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker / "miou.png", tmp_path / "a-folder.png"):  # no folder can be made; a folder is in the way
        (tmp_path / "a-folder.png").mkdir(exist_ok=True)
        assert summarize.main([str(folder), "--plot", str(out)]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"cannot write {out}:") and len(error.splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "a-folder.png", "empty", "logs"]
    with pytest.raises(SystemExit) as exit_info:
        summarize.main([str(folder), "--plot", str(tmp_path / "miou.pdf")])
    assert exit_info.value.code == 2 and "miou.pdf" in capsys.readouterr().err
