"""Summarise finished runs as the paper's result table.

    python launch/summarize.py <logdir> [--csv]

Reads every ``<logdir>/**/step<t>.json`` written after a step's test and keeps, per run (method,
name and setting), the last step found. Prints two Markdown tables, with rows ``method/name`` and
columns ``setting: old / new / all`` in percent: one with the background class counted in old and
all (the MiB paper's convention) and one over foreground classes only. A value marked ``*`` comes
from a run whose last step is not the task's final step. ``--csv`` prints one CSV row per run
instead.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

STEP_FILE = re.compile(r"step(\d+)\.json")
REQUIRED_KEYS = ("dataset", "task", "overlap", "step", "num_steps", "name")
CONVENTIONS = (
    ("with background", ("miou_old", "miou_new", "miou_all")),
    ("foreground only", ("miou_old_fg", "miou_new_fg", "miou_all_fg")),
)
CSV_COLUMNS = ("method", "name", "dataset", "task", "overlap", "step", "num_steps", "miou_old", "miou_new",
               "miou_all", "miou_old_fg", "miou_new_fg", "miou_all_fg", "hmean", "hmean_fg", "file")


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


def load_results(logdir: Path) -> List[dict]:
    """The last step's result of every run under ``logdir``."""
    if not logdir.is_dir():
        raise FileNotFoundError(f"log folder not found: {logdir}")
    last: Dict[Tuple[str, str, str], dict] = {}
    for path in sorted(logdir.rglob("step*.json")):
        if not STEP_FILE.fullmatch(path.name):
            continue
        result = _read(path)
        if result is None:
            continue
        key = (row_of(result), setting_of(result), str(path.parent))
        if key not in last or result["step"] > last[key]["step"]:
            last[key] = result
    # Two folders with the same method, name and setting: keep the one that got further.
    by_cell: Dict[Tuple[str, str], dict] = {}
    for (row, setting, _), result in sorted(last.items()):
        if (row, setting) in by_cell:
            kept = max(by_cell[(row, setting)], result, key=lambda r: r["step"])
            print(f"warning: {row} has two runs of {setting}; showing {kept['file']}", file=sys.stderr)
            result = kept
        by_cell[(row, setting)] = result
    return list(by_cell.values())


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def _setting_sort_key(result: dict) -> tuple:
    return result["dataset"], result["task"], bool(result["overlap"])


def markdown_tables(results: Sequence[dict]) -> str:
    """The two Markdown tables (with background / foreground only)."""
    settings = list(dict.fromkeys(setting_of(r) for r in sorted(results, key=_setting_sort_key)))
    rows = sorted({row_of(r) for r in results})
    cells = {(row_of(r), setting_of(r)): r for r in results}
    unfinished = any(r["step"] != r["num_steps"] - 1 for r in results)
    blocks = []
    for title, keys in CONVENTIONS:
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
    text = "\n\n".join(blocks) + "\n"
    if unfinished:
        text += "\n\\* last step of an unfinished run (not the task's final step)\n"
    return text


def csv_text(results: Sequence[dict]) -> str:
    """One CSV row per run, mIoU values as fractions."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for result in sorted(results, key=lambda r: (row_of(r), _setting_sort_key(r))):
        writer.writerow({column: result.get(column) for column in CSV_COLUMNS})
    return buffer.getvalue()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise step*.json results as the paper's table.")
    parser.add_argument("logdir", type=Path, help="log folder (the --logdir of the runs)")
    parser.add_argument("--csv", action="store_true", help="print CSV (one row per run) instead of Markdown")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.logdir)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not results:
        print(f"no step<t>.json results under {args.logdir}", file=sys.stderr)
        return 1
    sys.stdout.write(csv_text(results) if args.csv else markdown_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
