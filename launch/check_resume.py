"""Kill a mixed-precision training mid-step, resume it, and compare it with the same run uninterrupted.

Runs ``train.py`` (under torchrun with ``--nproc`` > 1) on a small synthetic VOC 15-5 step 0 three
times: uninterrupted; killed with SIGKILL right after iteration ``--kill_at`` (one rank, the
launcher stops the others); then the same command again, which resumes from the latest in-step
checkpoint. The resumed run's final weights are compared with the uninterrupted run's:

- on the CPU every kernel is deterministic, so they must be bit-identical (``--tolerance 0``);
- on CUDA some kernels accumulate atomically (e.g. the backward of bilinear upsampling), so a
  second uninterrupted run measures that noise floor, and the resumed run must stay within
  ``--noise_factor`` times it.

The in-step checkpoint the resumed run started from must hold the GradScaler's state under fp16
(its scale is reported). Prints one line, writes ``<output_dir>/resume-<amp>.json`` and each run's
console output, and exits 1 when the check fails. The runs' checkpoints go to a temporary folder.

  python launch/check_resume.py --amp fp16 --nproc 2 --device cuda --channels_last --dist_backend gloo \\
      --output_dir out                      # 2 ranks sharing one GPU, 20 iterations
  python launch/check_resume.py --amp bf16 --dry_run --output_dir out    # toy size on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from segmentation.data.synthetic import DIR_NAME, generate_synthetic_voc  # noqa: E402

DATASET, TASK = "synthetic", "15-5"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amp", required=True, choices=("bf16", "fp16"))
    parser.add_argument("--nproc", type=int, default=2, help="processes (torchrun when > 1)")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--norm_kernels", default="fused", choices=("auto", "fused", "reference"))
    parser.add_argument("--dist_backend", default="auto", choices=("auto", "nccl", "gloo"))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--crop_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4, help="per process")
    parser.add_argument("--iterations", type=int, default=20,
                        help="training iterations (2 epochs of as many images)")
    parser.add_argument("--kill_at", type=int, default=13, help="SIGKILL after this iteration")
    parser.add_argument("--ckpt_interval", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative weight difference accepted (default: 0 on the CPU, "
                        "noise_factor x the noise floor on CUDA)")
    parser.add_argument("--noise_factor", type=float, default=10.0)
    parser.add_argument("--dry_run", action="store_true",
                        help="toy size on the CPU: 32 px crops, 4 iterations, killed after 3")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per train.py launch")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.crop_size, args.batch_size = "cpu", 32, 2
        args.iterations, args.kill_at, args.ckpt_interval = 4, 3, 2
    if args.iterations % 2 or not 0 < args.kill_at < args.iterations:
        parser.error("--iterations must be even (2 epochs) and --kill_at inside the run")
    return args


def train_command(args: argparse.Namespace, data_root: Path, out: Path) -> List[str]:
    train = [str(REPO_ROOT / "train.py")]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(args.nproc)]
    else:
        launcher = [sys.executable]
    options = [
        "--dataset", DATASET, "--task", TASK, "--step", "0", "--data_root", str(data_root), "--name", "resume",
        "--backbone", args.backbone, "--crop_size", str(args.crop_size), "--batch_size", str(args.batch_size),
        "--epochs", "2", "--lr", "0.01", "--num_workers", "0", "--device", args.device, "--amp", args.amp,
        "--norm_kernels", args.norm_kernels, "--dist_backend", args.dist_backend,
        "--ckpt_interval", str(args.ckpt_interval), "--val_interval", "2", "--print_interval", "1",
        "--checkpoint_dir", str(out / "checkpoints"), "--logdir", str(out / "logs"), "--no-visualize",
    ]
    if args.channels_last:
        options.append("--channels_last")
    return [*launcher, *train, *options]


def launch(args: argparse.Namespace, data_root: Path, out: Path, log: Path,
           fault: Optional[str] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("SEGMENTATION_FAULT", None)
    if fault:
        env["SEGMENTATION_FAULT"] = fault
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(train_command(args, data_root, out), cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=args.timeout)
    log.write_text(result.stdout + result.stderr)
    return result


def run_folder(out: Path) -> Path:
    return out / "checkpoints" / f"{DATASET}-{TASK}" / "resume"


def final_weights(out: Path) -> Dict[str, torch.Tensor]:
    return torch.load(run_folder(out) / "step0.pth", map_location="cpu", weights_only=False)["model_state"]


def latest_in_step_checkpoint(out: Path) -> Optional[Dict[str, Any]]:
    found = sorted(run_folder(out).glob("step0-iter*.pth"), key=lambda path: int(path.stem.split("iter")[1]))
    return torch.load(found[-1], map_location="cpu", weights_only=False) if found else None


def largest_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """The largest difference of a floating-point tensor, relative to that tensor's largest magnitude."""
    largest = 0.0
    for name, value in a.items():
        if not value.is_floating_point():
            continue
        other = b[name].to(value.dtype)
        scale = max(float(value.abs().max()), 1e-30)
        largest = max(largest, float((value - other).abs().max()) / scale)
    return largest


def identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def check(args: argparse.Namespace, work: Path, output_dir: Path) -> Dict[str, Any]:
    """The three (on CUDA four) runs and the comparison; the result's "failure" says what failed."""
    data_root = work / "data"
    images = args.iterations // 2 * args.batch_size * args.nproc  # 2 epochs of full global batches
    generate_synthetic_voc(str(data_root / DIR_NAME), num_train=images, num_val=4, width=args.crop_size + 16,
                           height=args.crop_size + 8)
    result: Dict[str, Any] = {
        "amp": args.amp, "device": args.device, "nproc": args.nproc, "norm_kernels": args.norm_kernels,
        "channels_last": args.channels_last, "dist_backend": args.dist_backend, "backbone": args.backbone,
        "crop_size": args.crop_size, "killed_after": args.kill_at, "seconds": {},
    }
    prefix = output_dir / f"resume-{args.amp}"

    def timed(name: str, out: Path, fault: Optional[str] = None) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        completed = launch(args, data_root, out, Path(f"{prefix}-{name}.log"), fault)
        result["seconds"][name] = round(time.perf_counter() - start, 1)
        return completed

    def failed(name: str, completed: subprocess.CompletedProcess) -> Dict[str, Any]:
        tail = (completed.stdout + completed.stderr).strip().splitlines()[-5:]
        result["failure"] = f"the {name} run exited with {completed.returncode}: " + " | ".join(tail)
        return result

    completed = timed("uninterrupted", work / "uninterrupted")
    if completed.returncode != 0:
        return failed("uninterrupted", completed)
    per_epoch = re.search(r"(\d+) iterations per epoch", completed.stdout + completed.stderr)
    result["iterations"] = 2 * int(per_epoch.group(1)) if per_epoch else None
    if result["iterations"] is not None and args.kill_at >= result["iterations"]:
        result["failure"] = f"--kill_at {args.kill_at} is not inside the run's {result['iterations']} iterations"
        return result
    rank = "1" if args.nproc > 1 else "0"
    completed = timed("killed", work / "resumed", fault=f"kill:train-iteration:{args.kill_at}@{rank}")
    if completed.returncode == 0:
        result["failure"] = f"the run meant to be killed after iteration {args.kill_at} finished"
        return result
    state = latest_in_step_checkpoint(work / "resumed")
    if state is None:
        result["failure"] = f"no in-step checkpoint was left by the run killed after iteration {args.kill_at}"
        return result
    result["resumed_from"] = int(state["iteration"])
    scaler = state.get("scaler_state") or {}
    result["scaler_scale_at_checkpoint"] = float(scaler["scale"]) if "scale" in scaler else None
    result["scaler_steps_at_checkpoint"] = int(scaler["_growth_tracker"]) if "_growth_tracker" in scaler else None
    if args.amp == "fp16" and result["scaler_scale_at_checkpoint"] is None:
        result["failure"] = "the in-step checkpoint holds no GradScaler state under fp16"
        return result
    completed = timed("resumed", work / "resumed")
    if completed.returncode != 0:
        return failed("resumed", completed)
    if f"resumed from iteration {result['resumed_from']}" not in completed.stdout + completed.stderr:
        result["failure"] = f"the rerun did not say it resumed from iteration {result['resumed_from']}"
        return result

    uninterrupted, resumed = final_weights(work / "uninterrupted"), final_weights(work / "resumed")
    result["bit_identical"] = identical(uninterrupted, resumed)
    result["relative_difference"] = largest_difference(uninterrupted, resumed)
    tolerance = args.tolerance
    if tolerance is None and args.device == "cuda":
        completed = timed("repeated", work / "repeated")
        if completed.returncode != 0:
            return failed("repeated", completed)
        result["noise_floor"] = largest_difference(uninterrupted, final_weights(work / "repeated"))
        tolerance = args.noise_factor * result["noise_floor"]
    result["tolerance"] = tolerance or 0.0
    if not all(torch.isfinite(value).all() for value in resumed.values() if value.is_floating_point()):
        result["failure"] = "the resumed run's weights are not finite"
    elif result["relative_difference"] > result["tolerance"]:
        result["failure"] = (f"the resumed run's weights differ from the uninterrupted run's by "
                             f"{result['relative_difference']:.3g} (relative), above {result['tolerance']:.3g}")
    return result


def summary(result: Dict[str, Any]) -> str:
    setting = (f"{result['amp']}, {result['nproc']} process(es) on {result['device']}, {result['norm_kernels']} "
               f"kernels{', channels_last' if result['channels_last'] else ''}")
    if "failure" in result:
        return f"resume check ({setting}): FAILED: {result['failure']}"
    same = "bit-identical" if result["bit_identical"] else f"relative difference {result['relative_difference']:.3g}"
    if "noise_floor" in result:
        same += f" (two uninterrupted runs: {result['noise_floor']:.3g})"
    scale = result["scaler_scale_at_checkpoint"]
    scaler = (f"; the GradScaler's state (scale {scale:g}, {result['scaler_steps_at_checkpoint']} steps since "
              "it last changed) went through the checkpoint" if scale is not None else "")
    return (f"resume check ({setting}): ok, killed after iteration {result['killed_after']}, resumed from "
            f"{result['resumed_from']} of {result['iterations']}: {same}{scaler}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"check-resume-{args.amp}-"))
    try:
        result = check(args, work, output_dir)
    except subprocess.TimeoutExpired as error:
        result = {"amp": args.amp, "device": args.device, "nproc": args.nproc, "norm_kernels": args.norm_kernels,
                  "channels_last": args.channels_last, "failure": f"a launch ran past {error.timeout:.0f} s"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (output_dir / f"resume-{args.amp}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result), flush=True)
    return 1 if "failure" in result else 0


if __name__ == "__main__":
    sys.exit(main())
