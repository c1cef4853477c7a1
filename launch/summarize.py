"""Summarise finished runs as the paper's result table, and optionally plot mIoU against the step.

    python launch/summarize.py <logdir> [--csv] [--plot OUT.png]

Reads every ``<logdir>/**/step<t>.json`` written after a step's test and keeps, per run (method,
name and setting), the last step found. Prints two Markdown tables, with rows ``method/name`` and
columns ``setting: old / new / all`` in percent: one with the background class counted in old and
all (the MiB paper's convention) and one over foreground classes only; runs of domain-incremental
tasks get a table of their own, whose old / new / all are the test images of the earlier steps'
cities, of the last step's cities and of all of them. A value marked ``*`` comes
from a run whose last step is not the task's final step. ``--csv`` prints one CSV row per run
instead.

``--plot OUT.png`` also draws mIoU (%, with background) against the step for every step of every
run, unfinished ones included: one subplot per setting, one colour per run, one line style per
old / new / all (cities on domain tasks; no point where a value is null, as ``new`` at step 0 of a
class-incremental task). The PNG is written
atomically (a missing folder is created) and its path printed on stderr, so that stdout stays the
table or CSV. Only ``--plot`` imports matplotlib.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from segmentation.files import WriteError, atomic_write  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STEP_FILE = re.compile(r"step(\d+)\.json")
REQUIRED_KEYS = ("dataset", "task", "overlap", "step", "num_steps", "name")
CONVENTIONS = (
    ("with background", ("miou_old", "miou_new", "miou_all")),
    ("foreground only", ("miou_old_fg", "miou_new_fg", "miou_all_fg")),
)
# Domain-incremental results: the 19 classes on the test images of the old cities, of the step's
# new cities, and of all of them.
DOMAIN_CONVENTION = ("domain-incremental, by city", ("miou_old_domains", "miou_new_domains", "miou_all"))
CSV_COLUMNS = ("method", "name", "dataset", "task", "overlap", "step", "num_steps", "miou_old", "miou_new",
               "miou_all", "miou_old_fg", "miou_new_fg", "miou_all_fg", "hmean", "hmean_fg", "miou_old_domains",
               "miou_new_domains", "file")
# The plot's lines: label, key (with background, the paper's convention), line style, marker.
PLOT_LINES = (("old", "miou_old", "--", "s"), ("new", "miou_new", ":", "^"), ("all", "miou_all", "-", "o"))


def is_domain_result(result: dict) -> bool:
    """Whether ``result`` is a step of a domain-incremental task (its groups are cities, not classes)."""
    return "old_domains" in result


def setting_of(result: dict) -> str:
    """Column label of a result's setting: ``<dataset> <task>`` plus `` ov`` when overlapped."""
    return f"{result['dataset']} {result['task']}" + (" ov" if result["overlap"] else "")


def row_of(result: dict) -> str:
    return f"{result.get('method') or '-'}/{result['name']}"


def _read(path: Path) -> Optional[dict]:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"warning: skipping {path}: {error}", file=sys.stderr)
        return None
    missing = [key for key in REQUIRED_KEYS if not isinstance(result, dict) or key not in result]
    if missing:
        print(f"warning: skipping {path}: missing {', '.join(missing)}", file=sys.stderr)
        return None
    result["file"] = str(path)
    return result


def load_runs(logdir: Path) -> Dict[Tuple[str, str], List[dict]]:
    """The results of every run under ``logdir``, keyed by (``method/name``, setting), in step order."""
    if not logdir.is_dir():
        raise FileNotFoundError(f"log folder not found: {logdir}")
    by_folder: Dict[Tuple[str, str, str], Dict[int, dict]] = {}
    for path in sorted(logdir.rglob("step*.json")):
        if not STEP_FILE.fullmatch(path.name):
            continue
        result = _read(path)
        if result is None:
            continue
        key = (row_of(result), setting_of(result), str(path.parent))
        by_folder.setdefault(key, {})[result["step"]] = result
    # Two folders with the same method, name and setting: keep the one that got further.
    runs: Dict[Tuple[str, str], List[dict]] = {}
    for (row, setting, _), steps in sorted(by_folder.items()):
        run = [steps[step] for step in sorted(steps)]
        if (row, setting) in runs:
            run = max(runs[(row, setting)], run, key=lambda r: r[-1]["step"])
            print(f"warning: {row} has two runs of {setting}; showing {run[-1]['file']}", file=sys.stderr)
        runs[(row, setting)] = run
    return runs


def load_results(logdir: Path) -> List[dict]:
    """The last step's result of every run under ``logdir``."""
    return [run[-1] for run in load_runs(logdir).values()]


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def _setting_sort_key(result: dict) -> tuple:
    return result["dataset"], result["task"], bool(result["overlap"])


def markdown_tables(results: Sequence[dict]) -> str:
    """The Markdown tables: with background and foreground only for class-incremental tasks, by
    city for domain-incremental ones."""
    domain = [r for r in results if is_domain_result(r)]
    classes = [r for r in results if not is_domain_result(r)]
    blocks = (_tables(classes, CONVENTIONS) if classes else []) + (_tables(domain, (DOMAIN_CONVENTION,))
                                                                   if domain else [])
    text = "\n\n".join(blocks) + "\n"
    if any(r["step"] != r["num_steps"] - 1 for r in results):
        text += "\n\\* last step of an unfinished run (not the task's final step)\n"
    return text


def _tables(results: Sequence[dict], conventions) -> List[str]:
    """One Markdown table of ``results`` per (title, keys) of ``conventions``."""
    settings = list(dict.fromkeys(setting_of(r) for r in sorted(results, key=_setting_sort_key)))
    rows = sorted({row_of(r) for r in results})
    cells = {(row_of(r), setting_of(r)): r for r in results}
    blocks = []
    for title, keys in conventions:
        header = ["method/name"] + [f"{s}: {k.split('_')[1]}" for s in settings for k in keys]
        lines = [f"### mIoU (%), {title}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for row in rows:
            values = []
            for setting in settings:
                result = cells.get((row, setting))
                for key in keys:
                    if result is None:
                        values.append("")
                        continue
                    mark = "*" if result["step"] != result["num_steps"] - 1 else ""
                    values.append(_percent(result.get(key)) + mark)
            lines.append("| " + " | ".join([row] + values) + " |")
        blocks.append("\n".join(lines))
    return blocks


def csv_text(results: Sequence[dict]) -> str:
    """One CSV row per run, mIoU values as fractions."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for result in sorted(results, key=lambda r: (row_of(r), _setting_sort_key(r))):
        writer.writerow({column: result.get(column) for column in CSV_COLUMNS})
    return buffer.getvalue()


def plot_runs(runs: Dict[Tuple[str, str], List[dict]], path: Path) -> Figure:
    """Draw mIoU (%, with background) against the step of every run, write it to ``path`` as a PNG
    (atomically) and return the Figure.

    One subplot per setting, one colour per ``method/name``, one line style and marker per old /
    new / all; a null value (``new`` at step 0) has no point, a quantity with none has no line.
    """
    # The Figure is bound to the Agg canvas directly: pyplot (and its interactive backends and
    # global figure list) is never imported.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    ordered = sorted(runs.values(), key=lambda run: _setting_sort_key(run[-1]))
    settings = list(dict.fromkeys(setting_of(run[-1]) for run in ordered))
    rows = sorted({row for row, _ in runs})
    colours = {row: f"C{index % 10}" for index, row in enumerate(rows)}
    columns = min(len(settings), 3)
    grid_rows = -(-len(settings) // columns)
    figure = Figure(figsize=(4.5 * columns + 2.5, 3.5 * grid_rows + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(grid_rows, columns, squeeze=False).flatten()
    for axis in axes[len(settings):]:
        axis.remove()
    for axis, setting in zip(axes, settings):
        num_steps = 1
        for row in rows:
            run = runs.get((row, setting))
            if run is None:
                continue
            num_steps = max(num_steps, run[-1]["num_steps"])
            for quantity, key, style, marker in PLOT_LINES:
                if is_domain_result(run[-1]) and key != "miou_all":
                    key += "_domains"  # old and new cities
                points = [(result["step"], 100.0 * result[key]) for result in run if result.get(key) is not None]
                if points:
                    steps, values = zip(*points)
                    axis.plot(steps, values, color=colours[row], linestyle=style, marker=marker,
                              label=f"{row} {quantity}")
        # The whole task's steps, so that an unfinished run shows how far it got.
        axis.set_xlim(-0.25, num_steps - 0.75)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(setting)
        axis.set_xlabel("step")
        axis.set_ylabel("mIoU (%)")
        axis.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[row], label=row) for row in rows]
    handles += [Line2D([], [], color="black", linestyle=style, marker=marker, label=quantity)
                for quantity, _, style, marker in PLOT_LINES]
    figure.legend(handles=handles, loc="outside right upper")
    figure.suptitle("mIoU per step, with background")
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    return figure


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise step*.json results as the paper's table.")
    parser.add_argument("logdir", type=Path, help="log folder (the --logdir of the runs)")
    parser.add_argument("--csv", action="store_true", help="print CSV (one row per run) instead of Markdown")
    parser.add_argument("--plot", type=Path, metavar="OUT.png",
                        help="also draw mIoU (%%) against the step of every run into this PNG file")
    args = parser.parse_args(argv)
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        parser.error(f"--plot writes a PNG: give a file name ending in .png, not {args.plot}")
    try:
        runs = load_runs(args.logdir)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not runs:
        print(f"no step<t>.json results under {args.logdir}", file=sys.stderr)
        return 1
    results = [run[-1] for run in runs.values()]
    sys.stdout.write(csv_text(results) if args.csv else markdown_tables(results))
    if args.plot is not None:
        try:
            plot_runs(runs, args.plot)
        except WriteError as error:
            print(error, file=sys.stderr)
            return 1
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
