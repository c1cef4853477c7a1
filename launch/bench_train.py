"""Throughput, peak memory and model FLOPs utilisation of one training iteration, per variant.

The iteration is the project's own: ``build_model``, the MiB loss (``segmentation.methods.step_methods``),
``build_optimizer`` / ``build_scheduler`` and ``Trainer.run_step`` (forward under autocast, loss,
backward through the GradScaler, SGD step, LR step), on one fixed random batch that stays on the
device (data loading is measured by ``launch/bench_data.py``). Step 0 is VOC 15-5 step 0 (16
classes, cross-entropy); step 1 adds the frozen old model's forward, unbiased CE and unbiased KD
(the MiB preset of ``train.py``).

Variants (one table row each) differ in model (ours: DeepLabV3-ResNet-101 with In-Place ABN or ABN,
or torchvision's ``deeplabv3_resnet101`` with BatchNorm at output stride 8 and 16), precision,
memory format, ``torch.compile`` and the In-Place ABN kernels ("auto": fused on CUDA, or the
reference operations). A precision is the ``train.py`` options it measures (``PRECISION_OPTIONS``),
applied by the same ``configure_backends`` call as ``train.py``'s: fp32 = ``--amp off --tf32 off``
(true float32, the reference's configuration), tf32 = ``--amp off --tf32 on``, fp16 and bf16 =
``--amp fp16|bf16 --tf32 on`` (TF32 for what stays in float32). A variant that fails (out of
memory, compile error) gets its error in its row and the run goes on.

images/s is the batch divided by the median time of the timed iterations (after warm-up, each one
CUDA-synchronised). Peak memory is ``torch.cuda.max_memory_allocated`` over the timed iterations.
MFU divides the FLOPs of one training image (counted with ``torch.utils.flop_counter`` on the meta
device: convolutions and matrix products of the forwards and the backward) times images/s by the
device's dense peak for the precision (``--peak_tflops`` overrides it).

With ``--output_dir``, each row goes to ``results.jsonl`` and ``table.md`` as soon as it is measured
(``run.json`` holds the settings and the plan), so a run stopped early keeps what it measured.
``--record DIR`` measures nothing: it appends the Markdown section of what a measuring run (or a whole
``launch/gpu_session.sh``) left in DIR to ``docs/benchmarks.md`` (``--docs``).

Usage:
  python launch/bench_train.py --output_dir bench-out     # GPU, full plan
  python launch/bench_train.py --record bench-out         # then: the table into docs/benchmarks.md
  python launch/bench_train.py --quick                    # CPU smoke test
  python launch/bench_train.py --list                     # the plan's variants
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from segmentation import tasks  # noqa: E402
from segmentation.engine.backends import configure_backends  # noqa: E402
from segmentation.engine.options import parse_options  # noqa: E402
from segmentation.engine.sampler import GlobalBatchSampler  # noqa: E402
from segmentation.engine.optim import build_optimizer, build_scheduler  # noqa: E402
from segmentation.engine.trainer import Trainer  # noqa: E402
from segmentation.methods.step_methods import step_methods  # noqa: E402
from segmentation.models import build_model  # noqa: E402

DATASET, TASK = "synthetic", "15-5"  # the VOC 15-5 classes; the options need no data folder
# The train.py options (--amp, --tf32) each precision measures.
PRECISION_OPTIONS = {"fp32": ("off", "off"), "tf32": ("off", "on"), "fp16": ("fp16", "on"), "bf16": ("bf16", "on")}
PRECISIONS = tuple(PRECISION_OPTIONS)
DOCS = os.path.join(REPO_ROOT, "docs", "benchmarks.md")

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


def precision_options(precision: str) -> Tuple[str, str]:
    """The ``train.py`` options ``--amp`` and ``--tf32`` a precision stands for."""
    if precision not in PRECISION_OPTIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return PRECISION_OPTIONS[precision]


def configure(variant: Variant, device: torch.device) -> str:
    """The process-wide settings ``train.py`` makes for the variant's options (TF32, cuDNN autotuner, kernels)."""
    _, tf32 = precision_options(variant.precision)
    return configure_backends(variant.kernels, tf32, device)


def build_trainer(variant: Variant, backbone: str, tv_backbone: str, device: torch.device) -> Trainer:
    """Model(s), loss, optimizer and scheduler of a training step, exactly as ``train.py`` builds them."""
    amp, tf32 = precision_options(variant.precision)
    if variant.model == "torchvision" and variant.step > 0:
        raise ValueError("torchvision's DeepLabV3 is measured at step 0 only")
    options = ["--dataset", DATASET, "--task", TASK, "--step", str(variant.step), "--method", "MiB",
               "--backbone", backbone, "--no_pretrained", "--amp", amp, "--tf32", tf32,
               "--norm_kernels", variant.kernels]
    config = parse_options(options + (["--channels_last"] if variant.channels_last else []))
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

    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
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
    return Trainer(
        model, old_model, methods, optimizer, scheduler, [], sampler,
        device=device, epochs=1, amp=config.amp, channels_last=config.channels_last,
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
        print(f"  {configure(variant, device)}", flush=True)
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
        gc.collect()
        if variant.compile:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def profile(variant: Variant, args: argparse.Namespace, device: torch.device, path: str) -> None:
    """torch.profiler table of one variant's iteration (kernels by total device time)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    configure(variant, device)
    trainer = build_trainer(variant, args.backbone, args.tv_backbone, device)
    num_classes = sum(tasks.classes_per_step(DATASET, TASK, variant.step))
    images, labels = random_batch(variant.batch or args.batch, args.crop_size, num_classes, device)
    trainer.train_mode()
    for _ in range(args.warmup + (args.compile_warmup if variant.compile else 0)):
        trainer.run_step(images, labels)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    iterations = min(3, args.iterations)
    with torch_profile(activities=activities) as prof:
        for _ in range(iterations):
            trainer.run_step(images, labels)
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as handle:
        handle.write(f"{variant.name}, batch {variant.batch or args.batch}, {iterations} iteration(s)\n")
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


def precision_line() -> str:
    return "Precision = the `train.py` options measured: " + ", ".join(
        f"{name} = `--amp {amp} --tf32 {tf32}`" for name, (amp, tf32) in PRECISION_OPTIONS.items()
    ) + " (`--tf32 on` is the default)."


def training_table(info: Dict[str, str], settings: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """What was measured (one paragraph), the table and the FLOPs per training image."""
    versions = f"torch {info['torch']}"
    if "cuda" in info:
        versions += f", CUDA {info['cuda']}, cuDNN {info['cudnn']}, driver {info['driver']}"
    flops = sorted({(r["variant"].split("/")[0], r["output_stride"], r["step"], r["flops_per_image"])
                    for r in rows if r.get("flops_per_image")}, key=str)
    s = settings
    lines = [
        f"`{s['command']}`: {s['backbone']} (ours), torchvision {s['tv_backbone']}, "
        f"{s['crop_size']}x{s['crop_size']} crops, VOC {TASK} (step 1 = old-model forward + UnCE + UnKD), "
        f"median of {s['iterations']} iterations after {s['warmup']} warm-up "
        f"({s['warmup'] + s['compile_warmup']} with torch.compile); {versions}, Python {info['python']}. "
        + precision_line(),
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


def markdown(info: Dict[str, str], settings: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """The Markdown section of a measuring run (``table.md``)."""
    return f"#### Training step, {info['device']}, {info['date']}\n\n" + training_table(info, settings, rows)


# ------------------------------------------------------------------------------------------ --record
# The stages of launch/gpu_session.sh; each one's console output is <stage>.txt, its first line "+ <command>".
SESSION_STAGES = ("device", "kernels", "train_table", "resume_bf16", "resume_fp16", "data")


def read_lines(directory: str, name: str) -> Optional[List[str]]:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as handle:
        return handle.read().splitlines()


def stage_statuses(summary: Optional[List[str]]) -> Dict[str, str]:
    """Stage name -> "ok 41s" / "failed (1) 12s" / "timed out 80s", from the session's summary line."""
    line = summary[0] if summary else ""
    return {name: status for name, status in re.findall(r"(\w+) (ok \d+s|failed \(\d+\) \d+s|timed out \d+s)", line)}


def stage_heading(title: str, stage: str, directory: str, statuses: Dict[str, str], command: bool = True) -> str:
    """"**title** (`command`: status):", the command from the stage's output, its interpreter by name only."""
    lines = read_lines(directory, f"{stage}.txt") or []
    status = statuses.get(stage, "not run")
    if not (command and lines and lines[0].startswith("+ ")):
        return f"**{title}** ({status}):"
    interpreter, _, arguments = lines[0][2:].partition(" ")
    return f"**{title}** (`{os.path.basename(interpreter)} {arguments}`: {status}):"


def code_block(lines: List[str]) -> List[str]:
    return ["```text", *lines, "```", ""] if lines else ["(no output)", ""]


def kernel_check_lines(lines: List[str]) -> List[str]:
    pattern = r"(PASS|FAIL|forward\+backward|  \w+: reference|all checks passed|SOME CHECKS FAILED)"
    return [line for line in lines if re.match(pattern, line)]


def data_lines(lines: List[str]) -> List[str]:
    """bench_data.py's report (its tables and the cores per GPU), without warnings printed amid it."""
    kept: List[str] = []
    for line in lines:
        if line.startswith(("machine:", "data:", "split computation:", "|", "cores per GPU")):
            kept.append(line)
        elif not line.strip() and kept and kept[-1]:
            kept.append("")
    return kept


def training_rows(run: Dict[str, Any], rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The measured rows in plan order, and a row for each variant of the plan the run did not reach."""
    by_name = {row["variant"]: row for row in rows}
    missing = "not measured: the run stopped before it"
    return [by_name.get(entry["variant"], {**entry, "error": missing}) for entry in run["settings"]["plan"]]


def session_markdown(directory: str) -> str:
    """The Markdown section of what ``--output_dir`` or a ``gpu_session.sh`` session left in ``directory``."""
    run_lines = read_lines(directory, "run.json")
    run = json.loads("\n".join(run_lines)) if run_lines else None
    rows = [json.loads(line) for line in read_lines(directory, "results.jsonl") or [] if line.strip()]
    summary = read_lines(directory, "summary.txt")
    if run is None and summary is None:
        raise SystemExit(f"{directory} holds neither run.json (launch/bench_train.py --output_dir) nor summary.txt "
                         "(launch/gpu_session.sh): nothing to record")
    if summary is None:
        return markdown(run["info"], run["settings"], training_rows(run, rows))

    device_lines = read_lines(directory, "device.txt") or []
    device = run["info"]["device"] if run else next(
        (line[len("device: "):] for line in device_lines if line.startswith("device: ")), "unknown device")
    date = run["info"]["date"] if run else datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = next((line for line in device_lines if line.startswith("torch ")), "")
    statuses = stage_statuses(summary)
    lines = [f"#### GPU session, {device}, {date}", "", f"`bash launch/gpu_session.sh`: {summary[0]}",
             *([versions] if versions else []), ""]

    lines += [stage_heading("In-Place ABN kernels", "kernels", directory, statuses), ""]
    lines += code_block(kernel_check_lines(read_lines(directory, "kernels.txt") or []))

    lines += [stage_heading("Training step", "train_table", directory, statuses, command=False), ""]
    lines += [training_table(run["info"], run["settings"], training_rows(run, rows)) if run
              else "(no results: the stage wrote no run.json)\n"]

    lines += ["**Kill and resume** (`launch/check_resume.py`, 2 ranks sharing the GPU through gloo):", ""]
    for amp in ("bf16", "fp16"):
        stage = f"resume_{amp}"
        result = [line for line in read_lines(directory, f"{stage}.txt") or [] if line.startswith("resume check")]
        lines.append(f"- {amp} ({statuses.get(stage, 'not run')}): {result[-1] if result else 'no result line'}")
    lines.append("")

    lines += [stage_heading("Data pipeline", "data", directory, statuses), ""]
    lines += data_lines(read_lines(directory, "data.txt") or []) or ["(no output)"]
    if lines[-1]:
        lines.append("")

    profile_lines = read_lines(directory, "profile.txt")
    if profile_lines:
        lines += [f"<details><summary>torch.profiler: {profile_lines[0]} (top of profile.txt)</summary>", "",
                  *code_block(profile_lines[1:28]), "</details>", ""]
    return "\n".join(lines)


def record(directory: str, docs: str) -> str:
    """Append the Markdown section of ``directory`` (see ``session_markdown``) to ``docs``; returns it."""
    text = session_markdown(directory)
    with open(docs, "a") as handle:
        handle.write("\n" + text)
    return text


# ------------------------------------------------------------------------------------------ main
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
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of the first variant whose "
                        "name contains this to <output_dir>/profile.txt, right after measuring it")
    parser.add_argument("--output_dir", default=None,
                        help="run.json, then results.jsonl and table.md, written as rows finish")
    parser.add_argument("--list", action="store_true", help="print the plan's variant names and exit")
    parser.add_argument("--record", default=None, metavar="DIR",
                        help="measure nothing: append the Markdown section of what a run (--output_dir) or "
                        "launch/gpu_session.sh left in DIR to --docs")
    parser.add_argument("--docs", default=DOCS, help="the Markdown file --record appends to (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.record:
        print(record(args.record, args.docs))
        print(f"appended to {args.docs}")
        return
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
    profiled = next((i for i, v in enumerate(plan) if args.profile in v.name), None) if args.profile else None
    if args.profile and profiled is None:
        raise SystemExit(f"--profile {args.profile!r} matches no variant of the plan")

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    info = environment(device)
    settings: Dict[str, Any] = {
        "command": "python launch/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "backbone": args.backbone, "tv_backbone": args.tv_backbone, "crop_size": args.crop_size,
        "warmup": args.warmup, "compile_warmup": args.compile_warmup, "iterations": args.iterations,
        "plan": [{**dataclasses.asdict(v), "variant": v.name, "batch": v.batch or args.batch} for v in plan],
    }
    print(f"{info['device']}, torch {info['torch']}, {len(plan)} variants", flush=True)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "run.json"), "w") as handle:
            json.dump({"info": info, "settings": settings}, handle, indent=1)

    flops_cache: Dict[tuple, Optional[float]] = {}
    rows: List[Dict[str, Any]] = []
    start = time.perf_counter()
    for index, variant in enumerate(plan):
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            row = {**settings["plan"][index], "error": "skipped: time budget spent"}
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
                handle.write(markdown(info, settings, rows))
        if index == profiled and "error" not in row:
            # Right after its measurement, so that a run stopped later still has it.
            try:
                profile(variant, args, device, os.path.join(args.output_dir or ".", "profile.txt"))
            except Exception:  # noqa: BLE001 - the profile is extra; the measurements go on
                traceback.print_exc()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    print(markdown(info, settings, rows))


if __name__ == "__main__":
    main()
