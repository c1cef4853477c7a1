"""Loss traces of every method: each iteration's loss terms of a fixed two-step synthetic task
in float64, and sums of the weights and of the regularizer state that the step checkpoint
stores, recorded by running ``train.py``'s entry in this process.

    python tests/loss_traces.py      # rewrites tests/data/loss_traces.json from the current code

``test_loss_traces.py`` compares a fresh recording with that file, so a change of the engine or of
a method that moves any number of any method fails there. Rewrite the file only for a change
that is meant to change numbers, and say which in the commit.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple
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
Trace = Dict[str, object]


def _checkpoint_sums(path: Path) -> Dict[str, float]:
    """Sum of squares of the step checkpoint's weights, and the sum of every regularizer state."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=False)
    sums = {"weights": float(sum((value.double() ** 2).sum() for value in saved["model_state"].values()
                                 if value.is_floating_point()))}
    for name, state in sorted(saved["method_states"].items()):
        for key in ("fisher", "score"):
            if key in state:
                sums[f"{name}.{key}"] = float(sum(value.double().sum() for value in state[key].values()))
    return sums


def _record_run(args: List[str], step_checkpoint: Path) -> Trace:
    """Run ``args``: every training iteration's loss terms and the sums of its step checkpoint.

    In-step checkpoints are not written (they change no number, and a float64 one with every
    regularizer's state is close to 1 GB), and the validation and the test do not run (their
    numbers are not recorded)."""
    from segmentation.engine.checkpoint import InStepCheckpoints
    from segmentation.engine.run import StepRunner
    from segmentation.engine.trainer import Trainer

    trace: List[Dict[str, float]] = []
    run_step = Trainer.run_step

    def recording(self, images, labels):
        components = run_step(self, images, labels)
        trace.append({name: float(value) for name, value in components.items()})
        return components

    with mock.patch.object(Trainer, "run_step", recording), mock.patch.object(InStepCheckpoints, "save"), \
            mock.patch.object(StepRunner, "_validate"), mock.patch.object(StepRunner, "test"):
        run_train_in_process(args)
    return {"iterations": trace, "checkpoint": _checkpoint_sums(step_checkpoint)}


def record(data_root: str, out: Path) -> Dict[str, Trace]:
    """The trace of every run of ``STEP0_RUNS`` and ``STEP1_RUNS`` (output folders under ``out``)."""
    runs = out / "checkpoints" / "synthetic-15-5"
    traces: Dict[str, Trace] = {}
    for name, extra in STEP0_RUNS.items():
        traces[name] = _record_run(train_args(data_root, out, *COMMON, "--step", "0", *extra, name=name),
                                   runs / name / "step0.pth")
    for name, (step0, extra) in STEP1_RUNS.items():
        run_name = name.replace(" ", "-").replace(",", "")
        args = train_args(data_root, out, *COMMON, "--step", "1", "--step_ckpt", str(runs / step0 / "step0.pth"),
                          *extra, name=run_name)
        traces[name] = _record_run(args, runs / run_name / "step1.pth")
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
