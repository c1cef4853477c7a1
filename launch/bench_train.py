"""Throughput, peak memory and model FLOPs utilisation of one training iteration, per variant.

The iteration is the project's own: ``build_model``, the MiB loss (``segmentation.methods.step_methods``),
``build_optimizer`` / ``build_scheduler`` and ``Trainer.run_step`` (forward under autocast, loss,
backward through the GradScaler, SGD step, LR step), on one fixed random batch that stays on the
device (data loading is measured by ``launch/bench_data.py``). Step 0 is VOC 15-5 step 0 (16
classes, cross-entropy); step 1 adds the frozen old model's forward, unbiased CE and unbiased KD
(the MiB preset of ``train.py``).

Variants (one table row each) differ in model (ours: DeepLabV3-ResNet-101 with In-Place ABN or ABN,
or torchvision's ``deeplabv3_resnet101`` with BatchNorm at output stride 8 and 16), precision
(fp32 with TF32 off, fp32 with TF32 matmuls/convolutions, fp16 or bf16 autocast; the autocast
variants leave TF32 on for what stays in float32), memory format, ``torch.compile`` and the In-Place
ABN kernels (fused or the reference operations). A variant that fails (out of memory, compile
error) gets its error in its row and the run goes on.

images/s is the batch divided by the median time of the timed iterations (after warm-up, each one
CUDA-synchronised). Peak memory is ``torch.cuda.max_memory_allocated`` over the timed iterations.
MFU divides the FLOPs of one training image (counted with ``torch.utils.flop_counter`` on the meta
device: convolutions and matrix products of the forwards and the backward) times images/s by the
device's dense peak for the precision (``--peak_tflops`` overrides it).

Usage:
  python launch/bench_train.py --output_dir bench-out --append_docs docs/benchmarks.md   # GPU, full plan
  python launch/bench_train.py --quick                                                   # CPU smoke test
  python launch/bench_train.py --list                                                    # the plan's variants
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segmentation import tasks  # noqa: E402
from segmentation.engine.options import parse_options  # noqa: E402
from segmentation.engine.sampler import GlobalBatchSampler  # noqa: E402
from segmentation.engine.optim import build_optimizer, build_scheduler  # noqa: E402
from segmentation.engine.trainer import Trainer  # noqa: E402
from segmentation.methods.step_methods import step_methods  # noqa: E402
from segmentation.models import build_model, norm_kernels  # noqa: E402

DATASET, TASK = "synthetic", "15-5"  # the VOC 15-5 classes; the options need no data folder
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")

# Dense peak TFLOP/s (no sparsity) by device name: (fp32, tf32, fp16/bf16).
PEAK_TFLOPS = {
    "H100 PCIe": (51.2, 378.0, 756.0),
    "H100 NVL": (60.0, 417.5, 835.0),
    "H100": (66.9, 494.7, 989.4),  # SXM
    "H200": (66.9, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One measured configuration. ``model``: "ours" or "torchvision"; ``norm``: "iabn" or "abn" (ours)."""

    model: str = "ours"
    norm: str = "iabn"
    output_stride: int = 16
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    step: int = 0
    batch: Optional[int] = None  # None: --batch
    kernels: str = "auto"  # In-Place ABN kernels: "auto" (fused on CUDA) or "reference" (the operations as written)

    @property
    def name(self) -> str:
        parts = [
            "ours-" + self.norm if self.model == "ours" else "torchvision-bn",
            f"os{self.output_stride}",
            self.precision,
            "cl" if self.channels_last else "nchw",
        ]
        if self.compile:
            parts.append("compile")
        if self.kernels != "auto":
            parts.append("ref-kernels")
        parts.append(f"step{self.step}")
        if self.batch is not None:
            parts.append(f"b{self.batch}")
        return "/".join(parts)


def full_plan() -> List[Variant]:
    """The GPU plan, most important first (a time budget cuts the tail)."""
    ours, tv = "ours", "torchvision"
    return [
        Variant(ours, "iabn", 16, "fp32"),  # the reference's own configuration
        Variant(ours, "iabn", 16, "bf16", channels_last=True),
        Variant(ours, "iabn", 16, "bf16", channels_last=True, step=1),
        Variant(ours, "abn", 16, "fp32"),
        Variant(ours, "abn", 16, "bf16", channels_last=True),
        Variant(tv, "bn", 16, "fp32"),
        Variant(tv, "bn", 8, "fp32"),
        Variant(tv, "bn", 16, "bf16", channels_last=True),
        Variant(tv, "bn", 8, "bf16", channels_last=True),
        Variant(ours, "iabn", 16, "tf32"),
        Variant(ours, "iabn", 16, "fp16", channels_last=True),
        Variant(ours, "iabn", 16, "bf16"),
        Variant(ours, "iabn", 16, "bf16", channels_last=True, kernels="reference"),
        Variant(ours, "iabn", 16, "fp32", step=1),
        Variant(ours, "abn", 16, "bf16", channels_last=True, step=1),
        Variant(ours, "iabn", 16, "fp32", step=1, batch=24),
        Variant(ours, "abn", 16, "fp32", step=1, batch=24),
        Variant(ours, "iabn", 16, "bf16", channels_last=True, compile=True),
        Variant(ours, "abn", 16, "bf16", channels_last=True, compile=True),
        Variant(ours, "iabn", 16, "bf16", channels_last=True, compile=True, step=1),
        Variant(tv, "bn", 16, "bf16", channels_last=True, compile=True),
    ]


def quick_plan() -> List[Variant]:
    """The CPU smoke test: every code path of the harness on a small model."""
    ours, tv = "ours", "torchvision"
    return [
        Variant(ours, "iabn", 16, "fp32"),
        Variant(ours, "abn", 16, "fp32"),
        Variant(ours, "iabn", 16, "bf16", channels_last=True),
        Variant(ours, "iabn", 16, "fp32", step=1),
        Variant(tv, "bn", 8, "fp32"),
    ]


# ------------------------------------------------------------------------------------------ models
class TorchvisionSegmenter(nn.Module):
    """torchvision's DeepLabV3 (BatchNorm + ReLU, ASPP rates 12/24/36 at OS 8, 6/12/18 at OS 16) returning logits."""

    def __init__(self, backbone: str, num_classes: int, output_stride: int) -> None:
        super().__init__()
        from torchvision.models import resnet
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

        dilation = {8: [False, True, True], 16: [False, False, True]}[output_stride]
        rates = {8: (12, 24, 36), 16: (6, 12, 18)}[output_stride]
        body = getattr(resnet, backbone)(weights=None, replace_stride_with_dilation=dilation)
        self.model = DeepLabV3(IntermediateLayerGetter(body, {"layer4": "out"}), DeepLabHead(2048, num_classes, rates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def build_trainer(variant: Variant, backbone: str, tv_backbone: str, device: torch.device) -> Trainer:
    """Model(s), loss, optimizer and scheduler of a training step, exactly as ``train.py`` builds them."""
    if variant.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {variant.precision!r}; valid: {', '.join(PRECISIONS)}")
    if variant.model == "torchvision" and variant.step > 0:
        raise ValueError("torchvision's DeepLabV3 is measured at step 0 only")
    config = parse_options(
        ["--dataset", DATASET, "--task", TASK, "--step", str(variant.step), "--method", "MiB", "--backbone", backbone,
         "--no_pretrained"]
    )
    classes = tasks.classes_per_step(DATASET, TASK, variant.step)
    old_model = None
    if variant.model == "ours":
        model = build_model(classes, backbone, variant.output_stride, variant.norm)
        if variant.step > 0:
            old_model = build_model(classes[:-1], backbone, variant.output_stride, variant.norm)
            old_model.eval().requires_grad_(False)
            model.init_new_classifier()
    elif variant.model == "torchvision":
        model = TorchvisionSegmenter(tv_backbone, sum(classes), variant.output_stride)
    else:
        raise ValueError(f"unknown model {variant.model!r}; valid: ours, torchvision")

    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if old_model is not None:
        old_model = old_model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, config, variant.step)
    scheduler = build_scheduler(optimizer, config, total_iterations=10**6)
    methods = step_methods(config, variant.step, num_old_channels=sum(classes[:-1]),
                           num_channels=sum(classes))
    if variant.compile:
        model = torch.compile(model)
        if old_model is not None:
            old_model = torch.compile(old_model)
    batch = variant.batch or 1
    sampler = GlobalBatchSampler(batch, batch, rank=0, world_size=1, seed=0)
    amp = variant.precision if variant.precision in ("fp16", "bf16") else "off"
    return Trainer(
        model, old_model, methods, optimizer, scheduler, [], sampler,
        device=device, epochs=1, amp=amp, channels_last=variant.channels_last,
    )


def random_batch(batch: int, crop: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=generator)
    labels = torch.randint(0, num_classes, (batch, crop, crop), generator=generator)
    labels[torch.rand(batch, crop, crop, generator=generator) < 0.05] = 255  # some void pixels
    return images.to(device), labels.to(device)


def flops_per_image(variant: Variant, backbone: str, tv_backbone: str, crop: int) -> Optional[float]:
    """FLOPs of one training image (forwards and backward), counted on the meta device; None if that fails.

    Counted on a batch of 2: batch norm in training mode needs more than one value per channel.
    """
    from torch.utils.flop_counter import FlopCounterMode

    plain = dataclasses.replace(variant, precision="fp32", channels_last=False, compile=False, batch=2)
    try:
        trainer = build_trainer(plain, backbone, tv_backbone, torch.device("meta"))
        images = torch.empty(2, 3, crop, crop, device="meta")
        labels = torch.zeros(2, crop, crop, dtype=torch.long, device="meta")
        counter = FlopCounterMode(display=False)
        with counter:
            trainer.run_step(images, labels)
        return float(counter.get_total_flops()) / 2
    except Exception:  # noqa: BLE001 - MFU is then left out, the timing still stands
        traceback.print_exc()
        return None


# ------------------------------------------------------------------------------------------ measuring
def set_precision_flags(precision: str) -> None:
    """TF32 off only for the "fp32" variants (true float32, as the reference on pre-Ampere GPUs)."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: Variant, args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    """Run one variant; returns its row (with "error" set instead of numbers when it fails)."""
    batch = variant.batch or args.batch
    row: Dict[str, object] = {"variant": variant.name, "batch": batch, **dataclasses.asdict(variant)}
    row["batch"] = batch
    trainer = None
    try:
        set_precision_flags(variant.precision)
        norm_kernels.set_kernel_mode(variant.kernels)
        trainer = build_trainer(variant, args.backbone, args.tv_backbone, device)
        num_classes = sum(tasks.classes_per_step(DATASET, TASK, variant.step))
        images, labels = random_batch(batch, args.crop_size, num_classes, device)
        trainer.train_mode()
        warmup = args.warmup + (args.compile_warmup if variant.compile else 0)
        start = time.perf_counter()
        for _ in range(warmup):
            trainer.run_step(images, labels)
        synchronize(device)
        row["warmup_s"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.iterations):
            start = time.perf_counter()
            trainer.run_step(images, labels)
            synchronize(device)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        row["ms_per_iteration"] = median * 1000
        row["images_per_s"] = batch / median
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as error:  # noqa: BLE001 - record the failure (OOM, compile error) and go on
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        row["error"] = f"{type(error).__name__}: {message}"[:200]
        traceback.print_exc()
    finally:
        del trainer
        norm_kernels.set_kernel_mode("auto")
        gc.collect()
        if variant.compile:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def profile(variant: Variant, args: argparse.Namespace, device: torch.device, path: str) -> None:
    """torch.profiler table of one variant's iteration (kernels by total device time)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    set_precision_flags(variant.precision)
    trainer = build_trainer(variant, args.backbone, args.tv_backbone, device)
    num_classes = sum(tasks.classes_per_step(DATASET, TASK, variant.step))
    images, labels = random_batch(variant.batch or args.batch, args.crop_size, num_classes, device)
    trainer.train_mode()
    for _ in range(args.warmup + (args.compile_warmup if variant.compile else 0)):
        trainer.run_step(images, labels)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            trainer.run_step(images, labels)
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as handle:
        handle.write(f"{variant.name}, batch {variant.batch or args.batch}, 3 iterations\n")
        handle.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
    print(f"profile of {variant.name} written to {path}")


# ------------------------------------------------------------------------------------------ output
def environment(device: torch.device) -> Dict[str, str]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown"
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        info["device"] += f"{torch.get_num_threads()} threads)"
    return info


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    for key, peaks in PEAK_TFLOPS.items():  # more specific names first
        if key in device_name:
            return peaks[{"fp32": 0, "tf32": 1}.get(precision, 2)]
    return None


TABLE_HEADER = (
    "| variant | model | norm | OS | precision | channels_last | compile | step | batch | images/s | ms / iter "
    "| peak memory (GiB) | MFU | note |\n"
    "|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"
)


def table_row(row: Dict[str, object]) -> str:
    def number(key: str, fmt: str) -> str:
        return format(row[key], fmt) if row.get(key) is not None else "-"

    note = str(row.get("error", "")).replace("|", "/")
    if not note and row.get("kernels") == "reference":
        note = "In-Place ABN reference operations instead of the fused kernels"
    return (
        f"| {row['variant']} | {row['model']} | {row['norm']} | {row['output_stride']} | {row['precision']} "
        f"| {'yes' if row['channels_last'] else 'no'} | {'yes' if row['compile'] else 'no'} | {row['step']} "
        f"| {row['batch']} | {number('images_per_s', '.1f')} | {number('ms_per_iteration', '.1f')} "
        f"| {number('peak_memory_gib', '.2f')} | {number('mfu', '.1%')} | {note} |"
    )


def markdown(info: Dict[str, str], args: argparse.Namespace, command: str, rows: List[Dict[str, object]]) -> str:
    versions = f"torch {info['torch']}"
    if "cuda" in info:
        versions += f", CUDA {info['cuda']}, cuDNN {info['cudnn']}, driver {info['driver']}"
    flops = sorted({(r["variant"].split("/")[0], r["output_stride"], r["step"], r["flops_per_image"])
                    for r in rows if r.get("flops_per_image")}, key=str)
    lines = [
        f"#### Training step, {info['device']}, {info['date']}",
        "",
        f"`{command}`: {args.backbone} (ours), torchvision {args.tv_backbone}, "
        f"{args.crop_size}x{args.crop_size} crops, "
        f"VOC {TASK} (step 1 = old-model forward + UnCE + UnKD), median of {args.iterations} iterations after "
        f"{args.warmup} warm-up ({args.warmup + args.compile_warmup} with torch.compile); {versions}, "
        f"Python {info['python']}.",
        "",
        TABLE_HEADER,
        *[table_row(row) for row in rows],
        "",
    ]
    if flops:
        lines.append("FLOPs per training image: " + "; ".join(
            f"{name} OS{os_} step {step}: {value / 1e9:.0f} GFLOP" for name, os_, step, value in flops) + ".")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke test: resnet18 (torchvision: resnet50), 64 px, batch 2, one iteration")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--tv_backbone", default="resnet101", help="backbone of torchvision's DeepLabV3")
    parser.add_argument("--crop_size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=12, help="per-GPU batch (a variant may fix its own)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile_warmup", type=int, default=2, help="extra warm-up iterations with torch.compile")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations")
    parser.add_argument("--variants", default=None,
                        help="comma-separated substrings: measure only the plan's variants whose name contains one")
    parser.add_argument("--time_budget", type=float, default=None,
                        help="seconds; variants not started by then are recorded as skipped")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of the first variant "
                        "whose name contains this to <output_dir>/profile.txt after the measurements")
    parser.add_argument("--output_dir", default=None, help="results.jsonl and table.md, written as rows finish")
    parser.add_argument("--append_docs", default=None, help="Markdown file the table is appended to at the end")
    parser.add_argument("--list", action="store_true", help="print the plan's variant names and exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.tv_backbone, args.crop_size, args.batch = "resnet18", "resnet50", 64, 2
        args.warmup, args.iterations = 0, 1  # a smoke test: one timed iteration
    plan = quick_plan() if args.quick else full_plan()
    if args.variants:
        wanted = args.variants.split(",")
        plan = [v for v in plan if any(w in v.name for w in wanted)]
    if args.list:
        print("\n".join(v.name for v in plan))
        return

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    info = environment(device)
    command = "python launch/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{info['device']}, torch {info['torch']}, {len(plan)} variants", flush=True)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)

    flops_cache: Dict[tuple, Optional[float]] = {}
    rows: List[Dict[str, object]] = []
    start = time.perf_counter()
    for index, variant in enumerate(plan):
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            row = {"variant": variant.name, **dataclasses.asdict(variant), "batch": variant.batch or args.batch,
                   "error": "skipped: time budget spent"}
        else:
            print(f"[{index + 1}/{len(plan)}] {variant.name} ...", flush=True)
            row = measure(variant, args, device)
            key = (variant.model, variant.output_stride, variant.step)
            if key not in flops_cache:
                flops_cache[key] = flops_per_image(variant, args.backbone, args.tv_backbone, args.crop_size)
            row["flops_per_image"] = flops_cache[key]
            peak = args.peak_tflops or peak_tflops(info["device"], variant.precision)
            if row.get("images_per_s") and row["flops_per_image"] and peak:
                row["mfu"] = row["flops_per_image"] * row["images_per_s"] / (peak * 1e12)
        rows.append(row)
        print(table_row(row), flush=True)
        if args.output_dir:
            with open(os.path.join(args.output_dir, "results.jsonl"), "a") as handle:
                handle.write(json.dumps({**row, **info}) + "\n")
            with open(os.path.join(args.output_dir, "table.md"), "w") as handle:
                handle.write(markdown(info, args, command, rows))

    text = markdown(info, args, command, rows)
    print()
    print(text)
    if args.append_docs:
        with open(args.append_docs, "a") as handle:
            handle.write("\n" + text)
    if args.profile:
        matches = [v for v in plan if args.profile in v.name]
        if not matches:
            raise SystemExit(f"--profile {args.profile!r} matches no variant of the plan")
        profile(matches[0], args, device, os.path.join(args.output_dir or ".", "profile.txt"))


if __name__ == "__main__":
    main()
