"""Command-line options of ``train.py``.

The flags and their meanings follow the reference MiB/PLOP command line, so existing command
lines keep working, with these fixes:

- ``--method`` is case-insensitive (``MiB`` and the README's ``MIB`` both work).
- ``--overlapped`` is an alias of ``--overlap`` and ``--no-pretrained`` of ``--no_pretrained``.
- A method preset only fills in the options that were *not* given explicitly, so
  ``--method MiB --loss_kd 100`` really uses 100 (the reference let the preset win).
- The reference's inverted ``store_false`` flags are replaced by options that say what they do:
  ``--eval_full_image`` (old ``--crop_val``) and ``--visualize/--no-visualize``.
- ``--step`` takes one step, a comma-separated list or ``all``.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Set

from segmentation import tasks

DATASETS = ("synthetic", "voc", "ade")
METHODS = ("FT", "LWF", "LWF-MC", "ILT", "MiB")
NOT_IMPLEMENTED_METHODS = ("EWC", "PI", "RW")

# Loss options each method sets (reference presets; MiB's KD weight depends on the task, below).
PRESETS: Dict[str, Dict[str, object]] = {
    "FT": {},
    "LWF": {"loss_kd": 100.0},
    "LWF-MC": {"icarl": True, "icarl_importance": 10.0},
    "ILT": {"loss_kd": 100.0, "loss_de": 100.0},
    "MiB": {"loss_kd": 10.0, "unce": True, "unkd": True, "init_balanced": True},
}
# The paper's 15-1 results used MiB with loss_kd = 100, not the preset's 10 (confirmed by the authors).
MIB_KD_100_TASKS = ("15-5s", "15-1")

AMP_MODES = ("off", "fp16", "bf16")
OPT_LEVEL_TO_AMP = {"O0": "off", "O1": "fp16", "O2": "fp16", "O3": "fp16"}


def pretrained_default_path(backbone: str) -> str:
    """Where the reference looks for the In-Place ABN ImageNet weights (relative to the cwd)."""
    return os.path.join("pretrained", f"{backbone}_iabn_sync.pth.tar")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for on/off flags, options without a default and help that has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``train.py`` argument parser (no presets or validation: see :func:`parse_options`)."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Class-incremental semantic segmentation (MiB and baselines): train and/or "
        "test one or more incremental steps.",
        formatter_class=_HelpFormatter,
    )

    data = parser.add_argument_group("data")
    data.add_argument("--data_root", default="data",
                      help="folder holding PascalVOC12/, ADEChallengeData2016/ or SyntheticVOC/")
    data.add_argument("--dataset", default="synthetic", choices=DATASETS,
                      help="'synthetic' is a small generated VOC-like dataset (written under "
                      "<data_root>/SyntheticVOC on first use) so the quickstart needs no download")
    data.add_argument("--split_dir", default=None,
                      help="folder of existing split index files, e.g. the original code's data/voc/15-5 "
                           "(default: computed once, cached under <dataset>/incremental-splits/)")
    data.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")

    task = parser.add_argument_group("incremental task")
    task.add_argument("--task", default="19-1", help="task name, e.g. 19-1, 15-5, 15-1, 100-50")
    task.add_argument("--step", default="0",
                      help="step to run: one step (1), a comma list (0,1,2) or 'all'")
    task.add_argument("--overlap", "--overlapped", dest="overlap", action="store_true",
                      help="overlapped setting (default: disjoint)")

    method = parser.add_argument_group(
        "method and losses",
        "A --method preset fills in the loss options below that are not given explicitly.")
    method.add_argument("--method", default=None,
                        help="preset, case-insensitive: " + ", ".join(METHODS)
                        + f" (MiB uses loss_kd 100 on {' and '.join(MIB_KD_100_TASKS)})")
    method.add_argument("--loss_kd", type=float, default=0.0, help="weight of output distillation")
    method.add_argument("--loss_de", type=float, default=0.0,
                        help="weight of feature (L2) distillation on the backbone output")
    method.add_argument("--unce", action="store_true", help="unbiased cross-entropy (MiB)")
    method.add_argument("--unkd", action="store_true", help="unbiased knowledge distillation (MiB)")
    method.add_argument("--init_balanced", action="store_true",
                        help="initialise new classifiers from the background one (MiB)")
    method.add_argument("--alpha", type=float, default=1.0,
                        help="scale of the old logits before the distillation softmax")
    method.add_argument("--icarl", action="store_true",
                        help="BCE loss plus BCE distillation (LwF-MC)")
    method.add_argument("--icarl_importance", type=float, default=1.0,
                        help="weight of the LwF-MC distillation")
    method.add_argument("--freeze", action="store_true", help="do not train the backbone")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=0.007,
                       help="base learning rate (protocol: 0.01 at step 0, 0.001 later)")
    optim.add_argument("--incremental_lr", type=float, default=None,
                       help="base learning rate of the steps after step 0 (default: --lr); the protocol "
                            "in one launch is --step all --lr 0.01 --incremental_lr 0.001")
    optim.add_argument("--epochs", type=int, default=30, help="epochs per step")
    optim.add_argument("--batch_size", type=int, default=4,
                       help="batch size per process (protocol: 24 in total)")
    optim.add_argument("--crop_size", type=int, default=512, help="train crop / eval crop size")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    optim.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay")
    optim.add_argument("--lr_policy", default="poly", choices=("poly", "step"),
                       help="per-iteration learning-rate schedule")
    optim.add_argument("--lr_power", type=float, default=0.9, help="poly schedule power")
    optim.add_argument("--lr_decay_step", type=int, default=5000,
                       help="step schedule: iterations between decays")
    optim.add_argument("--lr_decay_factor", type=float, default=0.1,
                       help="step schedule: decay factor")
    optim.add_argument("--fix_bn", action="store_true",
                       help="freeze the normalisation layers (statistics and affine parameters)")
    optim.add_argument("--random_seed", type=int, default=42, help="seed of every generator")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet101", help="ResNet backbone, e.g. resnet101")
    model.add_argument("--output_stride", type=int, default=16, choices=(8, 16),
                       help="backbone output stride")
    model.add_argument("--norm_act", default="iabn_sync", choices=("iabn_sync", "iabn", "abn"),
                       help="normalisation: synchronised across processes (iabn_sync) or not")
    model.add_argument("--pretrained", default=None, metavar="PATH|torchvision",
                       help="ImageNet weights for the backbone: an In-Place ABN checkpoint or "
                       "'torchvision'. Default on voc/ade: "
                       + pretrained_default_path("<backbone>") + "; synthetic: none")
    model.add_argument("--no_pretrained", "--no-pretrained", dest="no_pretrained",
                       action="store_true", help="train the backbone from scratch")
    model.add_argument("--pooling", type=int, default=32,
                       help="window of the ASPP image-pooling branch at evaluation")

    perf = parser.add_argument_group("mixed precision and performance")
    perf.add_argument("--amp", default=None, choices=AMP_MODES,
                      help="mixed precision (default: off, or what --opt_level says)")
    perf.add_argument("--opt_level", default=None, choices=tuple(OPT_LEVEL_TO_AMP),
                      help="reference (apex) spelling: O0 = --amp off, O1/O2/O3 = --amp fp16")
    perf.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    perf.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="auto = cuda when available")

    ckpt = parser.add_argument_group("checkpoints and resuming")
    ckpt.add_argument("--checkpoint_dir", default="checkpoints",
                      help="checkpoints go to <checkpoint_dir>/<dataset>-<task>[-ov]/<name>/")
    ckpt.add_argument("--step_ckpt", default=None,
                      help="checkpoint of the previous step (default: step<t-1>.pth of this run)")
    ckpt.add_argument("--ckpt", default=None,
                      help="checkpoint of the current step to resume from or to test "
                      "(single step only)")
    ckpt.add_argument("--ckpt_interval", type=int, default=500,
                      help="save an in-step checkpoint every N iterations and at every epoch end "
                      "(0 = epoch ends only)")
    ckpt.add_argument("--no_resume", dest="resume", action="store_false",
                      help="ignore in-step checkpoints left by an interrupted run")
    ckpt.add_argument("--max_bad_iterations", type=int, default=0,
                      help="skip up to N iterations whose loss or gradient is NaN/Inf (with a "
                      "warning each) instead of stopping at the first")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--test", action="store_true", help="skip training, only test")
    evaluation.add_argument("--val_interval", type=int, default=1, help="validate every N epochs")
    evaluation.add_argument("--eval_full_image", "--crop_val", dest="eval_full_image",
                            action="store_true",
                            help="evaluate full-resolution images (batch 1) instead of the "
                            "resize + centre crop of the protocol; --crop_val is the reference's "
                            "name for the same thing")

    logging_ = parser.add_argument_group("logging")
    logging_.add_argument("--name", default="Experiment", help="run name (logs and checkpoints)")
    logging_.add_argument("--logdir", default="logs",
                          help="logs go to <logdir>/<dataset>-<task>[-ov]/<name>/")
    logging_.add_argument("--visualize", action=argparse.BooleanOptionalAction, default=True,
                          help="write TensorBoard event files (rank 0); on by default")
    logging_.add_argument("--no_visualize", dest="visualize", action="store_false",
                          help=argparse.SUPPRESS)
    logging_.add_argument("--sample_num", type=int, default=0,
                          help="validation samples logged as images")
    logging_.add_argument("--print_interval", type=int, default=10,
                          help="iterations between loss logs")

    dist = parser.add_argument_group(
        "distributed",
        "Launch with torchrun (or srun under SLURM); the rank comes from the environment.")
    dist.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                      help="accepted for torch.distributed.launch command lines and ignored")
    dist.add_argument("--collective_timeout", type=float, default=300.0,
                      help="seconds a process waits for the others (or for a data-loader worker) "
                      "before the run stops with an error naming what it waited for")
    return parser


def _explicit_options(argv: Optional[List[str]]) -> Set[str]:
    """Destinations of the options given on the command line."""
    parser = build_parser()
    # With every default suppressed, the namespace holds exactly the options that were given.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _normalise_method(parser: argparse.ArgumentParser, method: Optional[str]) -> Optional[str]:
    if method is None:
        return None
    by_lower = {name.lower(): name for name in METHODS}
    key = method.lower().replace("_", "-")
    if key in by_lower:
        return by_lower[key]
    if key.upper() in NOT_IMPLEMENTED_METHODS:
        parser.error(f"--method {method}: {key.upper()} is not implemented yet; "
                     f"available methods: {', '.join(METHODS)}")
    parser.error(f"--method {method}: unknown method; available methods: {', '.join(METHODS)}")


def _resolve_steps(parser: argparse.ArgumentParser, dataset: str, task: str, step: str) -> List[int]:
    try:
        total = tasks.num_steps(dataset, task)
    except ValueError as error:
        parser.error(f"--task {task}: {error}")
    valid = f"valid steps of {dataset} {task}: 0..{total - 1} or 'all'"
    if step.strip().lower() == "all":
        return list(range(total))
    try:
        steps = [int(part) for part in step.split(",")]
    except ValueError:
        parser.error(f"--step {step}: not a step, a comma list of steps or 'all'; {valid}")
    for value in steps:
        if not 0 <= value < total:
            parser.error(f"--step {step}: step {value} does not exist; {valid}")
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        parser.error(f"--step {step}: steps must be given in increasing order")
    return steps


def _resolve_amp(parser: argparse.ArgumentParser, amp: Optional[str], opt_level: Optional[str]) -> str:
    if opt_level is None:
        return amp or "off"
    from_level = OPT_LEVEL_TO_AMP[opt_level]
    if amp is not None and amp != from_level:
        parser.error(f"--amp {amp} conflicts with --opt_level {opt_level} (= --amp {from_level}); "
                     "give only one of them")
    return from_level


def _resolve_pretrained(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> Optional[str]:
    if opts.no_pretrained:
        if opts.pretrained is not None:
            parser.error("--pretrained and --no_pretrained contradict each other; give one")
        return None
    if opts.pretrained is not None:
        if opts.pretrained != "torchvision" and not os.path.isfile(opts.pretrained):
            parser.error(f"--pretrained {opts.pretrained}: file not found "
                         "(give an existing checkpoint, 'torchvision' or --no_pretrained)")
        return opts.pretrained
    # ImageNet weights only matter when a step-0 model is trained; later steps and --test
    # start from a checkpoint.
    if opts.dataset == "synthetic" or opts.test or 0 not in opts.steps:
        return None
    default = pretrained_default_path(opts.backbone)
    if not os.path.isfile(default):
        parser.error(
            f"ImageNet weights not found at {default}. Download the In-Place ABN ImageNet "
            f"checkpoint of {opts.backbone} (mapillary/inplace_abn, '{opts.backbone} InPlace-ABN "
            f"sync') and save it as {default}, or pass --pretrained torchvision to use "
            "torchvision's weights, or --no_pretrained to train from scratch")
    return default


def _check_ranges(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    positive = ("lr", "epochs", "batch_size", "crop_size", "val_interval", "print_interval",
                "pooling", "lr_decay_step", "collective_timeout")
    if opts.incremental_lr is not None and opts.incremental_lr <= 0:
        parser.error(f"--incremental_lr must be positive, got {opts.incremental_lr}")
    for name in positive:
        if getattr(opts, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(opts, name)}")
    non_negative = ("num_workers", "ckpt_interval", "sample_num", "loss_kd", "loss_de",
                    "icarl_importance", "weight_decay", "max_bad_iterations")
    for name in non_negative:
        if getattr(opts, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(opts, name)}")
    if opts.ckpt is not None and len(opts.steps) > 1:
        parser.error(f"--ckpt belongs to one step, but --step selects steps {opts.steps}")
    if opts.step_ckpt is not None and len(opts.steps) > 1:
        parser.error(f"--step_ckpt belongs to one step, but --step selects steps {opts.steps}")
    if opts.step_ckpt is not None and opts.steps == [0]:
        parser.error("--step_ckpt is the checkpoint of the previous step; step 0 has none")


def parse_options(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``), apply the method preset and validate.

    Errors exit through ``parser.error`` with a message naming the option at fault.
    """
    parser = build_parser()
    opts = parser.parse_args(argv)
    explicit = _explicit_options(argv)

    opts.method = _normalise_method(parser, opts.method)
    if opts.method is not None:
        preset = dict(PRESETS[opts.method])
        if opts.method == "MiB" and opts.task in MIB_KD_100_TASKS:
            preset["loss_kd"] = 100.0
        for name, value in preset.items():
            if name not in explicit:
                setattr(opts, name, value)

    opts.steps = _resolve_steps(parser, opts.dataset, opts.task, opts.step)
    del opts.step  # the resolved list replaces it
    opts.amp = _resolve_amp(parser, opts.amp, opts.opt_level)
    del opts.opt_level
    opts.pretrained = _resolve_pretrained(parser, opts)
    _check_ranges(parser, opts)
    if not opts.visualize:
        opts.sample_num = 0  # images are only logged to TensorBoard
    return opts
