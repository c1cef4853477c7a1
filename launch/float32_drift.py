"""How far float32 runs that compute the same thing in exact arithmetic end apart: the tests' tiny
synthetic step 0 (ResNet-18, 48 px crops, a global batch of 4, 7 iterations at LR 0.01) on 1 process,
against the same step on 2 processes, on 2 processes killed after iteration 3 and resumed on 1, on
2 processes with In-Place ABN's compiled kernels, and on 1 process with 2 threads instead of 1.

    python launch/float32_drift.py --output_dir /tmp/drift

Prints, for each variant, the relative L2 distance of its final weights from the 1-process run's
over the whole model, and the largest relative distance of one tensor (``max |a - b| / max |a|``).
In float64 the same runs agree to 1e-9 (tests/test_train_distributed.py): what is printed here is
rounding that training amplifies.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make the package importable
    sys.path.insert(0, str(REPO_ROOT))

from segmentation.data.synthetic import DIR_NAME, generate_synthetic_voc  # noqa: E402


def train_options(data_root: Path, out: Path, batch_size: int, *extra: str) -> List[str]:
    return [
        "--dataset", "synthetic", "--data_root", str(data_root), "--task", "15-5", "--step", "0",
        "--method", "MiB", "--name", "drift", "--backbone", "resnet18", "--norm_act", "iabn_sync",
        "--crop_size", "48", "--batch_size", str(batch_size), "--epochs", "1", "--lr", "0.01",
        "--num_workers", "0", "--ckpt_interval", "2", "--device", "cpu", "--no-visualize",
        "--checkpoint_dir", str(out / "checkpoints"), "--logdir", str(out / "logs"), *extra,
    ]


def train(options: List[str], processes: int = 1, threads: int = 1, fault: str = "", check: bool = True) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), str(REPO_ROOT / "train.py"), *options]
    env = {key: value for key, value in os.environ.items() if key != "SEGMENTATION_FAULT"}
    env["OMP_NUM_THREADS"] = str(threads)
    if fault:
        env["SEGMENTATION_FAULT"] = fault
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def final_weights(out: Path) -> Dict[str, torch.Tensor]:
    saved = torch.load(out / "checkpoints" / "synthetic-15-5" / "drift" / "step0.pth", map_location="cpu",
                       weights_only=False)
    return {key: value.double() for key, value in saved["model_state"].items()
            if value.is_floating_point() and "running" not in key}


def distances(reference: Dict[str, torch.Tensor], other: Dict[str, torch.Tensor]) -> str:
    whole = (sum(((reference[k] - other[k]) ** 2).sum() for k in reference)
             / sum((value ** 2).sum() for value in reference.values())).sqrt().item()
    worst, name = max(((reference[k] - other[k]).abs().max().item() / reference[k].abs().max().item(), k)
                      for k in reference)
    return f"whole model {whole:.2%}, worst tensor {worst:.1%} ({name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="a folder for the data and the runs (emptied first)")
    out = Path(parser.parse_args().output_dir)
    shutil.rmtree(out, ignore_errors=True)
    data_root = out / "data"
    generate_synthetic_voc(str(data_root / DIR_NAME), num_train=40, num_val=20, width=64, height=48)

    train(train_options(data_root, out / "one", 4))
    train(train_options(data_root, out / "two", 2), processes=2)
    resumed = out / "two-killed-resumed-on-one"
    train(train_options(data_root, resumed, 2), processes=2, fault="kill:train-iteration:3", check=False)
    train(train_options(data_root, resumed, 4))
    train(train_options(data_root, out / "two-fused", 2, "--norm_kernels", "fused"), processes=2)
    train(train_options(data_root, out / "one-2-threads", 4), threads=2)

    reference = final_weights(out / "one")
    print("float32, distance of the final weights from the 1-process, 1-thread run:")
    for name, label in (("two", "2 processes"),
                        ("two-killed-resumed-on-one", "2 processes killed after iteration 3, resumed on 1"),
                        ("two-fused", "2 processes, compiled In-Place ABN kernels"),
                        ("one-2-threads", "1 process, 2 threads")):
        print(f"  {label}: {distances(reference, final_weights(out / name))}")


if __name__ == "__main__":
    main()
