"""Loss traces of every method: each iteration's loss terms of a fixed two-step synthetic task
in float64, and sums of the weights and of the regularizer state that the step checkpoint
stores, recorded by running ``train.py``'s entry in this process.

The step-0 checkpoints are written and summed as read back (the step-1 runs start from them); a
step-1 run's checkpoint is summed as the run hands it to be written, and written only when asked
(``step_files``): the same numbers without writing, reading back and checksumming 1.9 GB of float64
checkpoints (about 25 s of the 85 s recording on a 2-core machine). The PLOP runs (``PLOP_RUNS``)
are recorded once per test session (conftest.py's ``float64_plop_runs``), which
test_plop_train.py's 1-process-equals-2 test shares.

    python tests/loss_traces.py      # rewrites tests/data/loss_traces.json from the current code

``test_loss_traces.py`` compares a fresh recording with that file, so a change of the engine or of
a method that moves any number of any method fails there. Rewrite the file only for a change
that is meant to change numbers, and say which in the commit.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple
from unittest import mock

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from train_cli_worker import run_train_in_process, train_args  # noqa: E402

TRACES_PATH = TESTS / "data" / "loss_traces.json"
# The shared step 0 estimates every regularizer's importance; LwF-MC trains its own (BCE) and PLOP
# its own (PLOP's labels). PLOP's grid is 2x2 at most: 32 px crops give 2-pixel maps at stride 16.
PLOP = ("--method", "PLOP", "--spp_scales", "1", "2")
STEP0_RUNS: Dict[str, Tuple[str, ...]] = {
    "step0-ce": ("--estimate_importance", "ewc", "pi", "rw"),
    "step0-lwf-mc": ("--method", "LWF-MC"),
    "step0-plop": PLOP,
}
# Step 1 from a step 0 above: every method, and the options the presets leave at their defaults.
STEP1_RUNS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "FT": ("step0-ce", ("--method", "FT")),
    "PI": ("step0-ce", ("--method", "PI")),
    "EWC": ("step0-ce", ("--method", "EWC")),
    "RW": ("step0-ce", ("--method", "RW", "--reg_iterations", "1")),
    "LWF": ("step0-ce", ("--method", "LWF")),
    "LWF-MC": ("step0-lwf-mc", ("--method", "LWF-MC")),
    "ILT": ("step0-ce", ("--method", "ILT")),
    "MiB": ("step0-ce", ("--method", "MiB")),
    "MiB alpha 0.5, freeze": ("step0-ce", ("--method", "MiB", "--alpha", "0.5", "--freeze")),
    "iCaRL disjoint with background": ("step0-lwf-mc", ("--method", "LWF-MC", "--icarl_disjoint",
                                                        "--icarl_bkg")),
    "PLOP": ("step0-plop", PLOP),
    "PLOP median thresholds, global POD": ("step0-plop", (*PLOP, "--pseudo_thresholds", "median", "--pod",
                                                          "global")),
}
COMMON = ("--dtype", "float64", "--crop_size", "32", "--ckpt_interval", "0", "--print_interval", "1")
# The PLOP runs, which conftest.py's ``float64_plop_runs`` records once per test session.
PLOP_RUNS = ("step0-plop", "PLOP", "PLOP median thresholds, global POD")
Trace = Dict[str, object]


def run_name(name: str) -> str:
    """The ``--name`` of run ``name`` of ``STEP0_RUNS`` or ``STEP1_RUNS``."""
    return name.replace(" ", "-").replace(",", "")


def step_checkpoint(out: Path, name: str) -> Path:
    """The step checkpoint that run ``name`` writes under ``out``."""
    file_name = "step0.pth" if name in STEP0_RUNS else "step1.pth"
    return out / "checkpoints" / "synthetic-15-5" / run_name(name) / file_name


def run_args(name: str, data_root: str, out: Path, step0_out: Optional[Path] = None) -> List[str]:
    """The ``train.py`` options of run ``name``, writing under ``out``; a step-1 run starts from the
    checkpoint of its step 0 written under ``step0_out`` (``out`` by default)."""
    if name in STEP0_RUNS:
        return train_args(data_root, out, *COMMON, "--step", "0", *STEP0_RUNS[name], name=run_name(name))
    step0, extra = STEP1_RUNS[name]
    return train_args(data_root, out, *COMMON, "--step", "1", "--step_ckpt",
                      str(step_checkpoint(step0_out or out, step0)), *extra, name=run_name(name))


def _state_sums(saved: Dict[str, object]) -> Dict[str, float]:
    """Sum of squares of a step checkpoint's weights, and the sum of every regularizer state."""
    sums = {"weights": float(sum((value.double() ** 2).sum() for value in saved["model_state"].values()
                                 if value.is_floating_point()))}
    for name, state in sorted(saved["method_states"].items()):
        for key in ("fisher", "score"):
            if key in state:
                sums[f"{name}.{key}"] = float(sum(value.double().sum() for value in state[key].values()))
    return sums


def _checkpoint_sums(path: Path) -> Dict[str, float]:
    """``_state_sums`` of the step checkpoint file at ``path``."""
    import torch

    return _state_sums(torch.load(path, map_location="cpu", weights_only=False))


def _record_run(args: List[str], checkpoint_path: Path, write: bool = True) -> Trace:
    """Run ``args``: every training iteration's loss terms and the sums of its step checkpoint, as
    read back from the file, or (``write`` False) as the run hands it to be written, without
    writing it.

    In-step checkpoints are not written (they change no number, and a float64 one with every
    regularizer's state is close to 1 GB), and the validation and the test do not run (their
    numbers are not recorded)."""
    from segmentation.engine.checkpoint import InStepCheckpoints
    from segmentation.engine.run import StepRunner
    from segmentation.engine.run_files import RunFiles
    from segmentation.engine.trainer import Trainer

    trace: List[Dict[str, float]] = []
    handed: List[Dict[str, object]] = []
    run_step = Trainer.run_step

    def recording(self, images, labels):
        components = run_step(self, images, labels)
        trace.append({name: float(value) for name, value in components.items()})
        return components

    def keep(self, state, step, verify):  # what the run hands to RunFiles to write
        handed.append(state)

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(Trainer, "run_step", recording))
        for target, name in ((InStepCheckpoints, "save"), (StepRunner, "_validate"), (StepRunner, "test")):
            patches.enter_context(mock.patch.object(target, name))
        if not write:
            patches.enter_context(mock.patch.object(RunFiles, "save_step_checkpoint", keep))
        run_train_in_process(args)
    if write:
        sums = _checkpoint_sums(checkpoint_path)
    else:
        assert len(handed) == 1 and not checkpoint_path.exists(), "one step checkpoint, not written"
        sums = _state_sums(handed[0])
    return {"iterations": trace, "checkpoint": sums}


def record(data_root: str, out: Path, runs: Optional[Iterable[str]] = None,
           step_files: Iterable[str] = ()) -> Dict[str, Trace]:
    """The trace of each run of ``runs`` (every run of ``STEP0_RUNS`` and ``STEP1_RUNS`` by default),
    output folders under ``out``; a step-1 run's step 0 must be among them. The step-1 runs of
    ``step_files`` write their step checkpoint (summed as read back), the others do not (summed as
    handed to be written)."""
    selected = [*STEP0_RUNS, *STEP1_RUNS] if runs is None else list(runs)
    unknown = set(selected) - set(STEP0_RUNS) - set(STEP1_RUNS)
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}")
    step_files = set(step_files)
    traces: Dict[str, Trace] = {}
    for name in [*filter(STEP0_RUNS.__contains__, selected), *filter(STEP1_RUNS.__contains__, selected)]:
        traces[name] = _record_run(run_args(name, data_root, out), step_checkpoint(out, name),
                                   write=name in STEP0_RUNS or name in step_files)
    return traces


def main() -> None:
    import torch

    from segmentation.data.synthetic import DIR_NAME, generate_synthetic_voc

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        # The data of conftest.py's ``data_root`` fixture.
        generate_synthetic_voc(str(root / "data" / DIR_NAME), num_train=40, num_val=20, width=64, height=48)
        traces = record(str(root / "data"), root / "out")
    TRACES_PATH.write_text(json.dumps(traces, indent=1) + "\n")
    print(f"wrote {TRACES_PATH}: {sum(len(trace['iterations']) for trace in traces.values())} iterations "
          f"of {len(traces)} runs")


if __name__ == "__main__":
    main()
