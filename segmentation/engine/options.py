"""Command-line options of ``train.py``.

The flags and their meanings follow the reference MiB/PLOP command line, so existing command
lines keep working, with these fixes:

- ``--method`` is case-insensitive (``MiB`` and the README's ``MIB`` both work).
- ``--overlapped`` is an alias of ``--overlap`` and ``--no-pretrained`` of ``--no_pretrained``.
- A method preset only fills in the options that were *not* given explicitly, so
  ``--method MiB --loss_kd 100`` really uses 100 (the reference let the preset win).
- The reference's inverted ``store_false`` flags are replaced by options that say what they do:
  ``--eval_full_image`` (old ``--crop_val``) and ``--no-visualize``.
- ``--step`` takes one step, several (``0 1`` as in PLOP, or ``0,1``) or ``all``; ``--lr`` takes
  one value, or one value per selected step (PLOP's ``--lr 0.01 0.001``).
- ``--visualize`` is refused: the reference's flag turned TensorBoard *off*; use ``--no-visualize``.
- PLOP's options that do not change results here (``--date``, ``--code_directory``,
  ``--strict_weights``, ...) are accepted and ignored with a note; PLOP's experimental options,
  which none of its scripts uses (``--cosine``, ``--lr_old``, ...), are refused with one line.
- ``--label_protocol`` is ``plop`` by default when PLOP's ``--pod`` or ``--pseudo`` is set (after
  the ``--method`` preset), ``mib`` otherwise; the log says when it was chosen so.

Parsing never imports torch, so ``--help`` and usage errors answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, NoReturn, Optional, Set, Tuple

from segmentation import tasks
from segmentation.config import Config
from segmentation.domain_tasks import DOMAIN_SPLIT_MODES
from segmentation.engine.checks import check_options, pretrained_default_path
from segmentation.errors import UsageError
from segmentation.methods import (
    find_method, method_names, method_preset, methods_option_owners,
)

DATASETS = ("synthetic", "voc", "ade", "synthetic_domain", "cityscapes_domain")
DTYPES = ("float32", "float64")
# As segmentation.models.norm_kernels.KERNEL_MODES (which imports torch).
NORM_KERNELS = ("auto", "fused", "reference")

# As segmentation.data.protocol's LABEL_PROTOCOLS and DATA_MASKINGS (which imports torch; the
# parser must not). PLOP's "all" masking is refused: the original raised NotImplementedError.
LABEL_PROTOCOLS = ("mib", "plop")
DATA_MASKINGS = ("current", "current+old", "new", "all")

_UNUSED = "the original does not use it either"
# PLOP options that change nothing here, and why: accepted, noted in the log, not in the
# configuration. Options that take a value, then on/off flags.
PLOP_IGNORED_OPTIONS = {
    "--date": "it named the original's results file",
    "--code_directory": "it located the original's ImageNet weights; see --pretrained",
    "--num_classes": "it sized the original's results file",
    "--fusion-mode": _UNUSED,
    "--pod_apply": _UNUSED,
    "--step_threshold": "it had no effect in the original: it was applied after the threshold was read",
}
PLOP_IGNORED_FLAGS = {
    "--dont_predict_bg": _UNUSED,
    "--pod_interpolate_last": _UNUSED,
    "--entropy_min_mean_pixels": _UNUSED,
    "--strict_weights": "it made the original load checkpoints non-strictly; here the step t-1 weights are "
                        "always checked (only the new head may be missing), so a checkpoint that fits loads "
                        "the same either way and any other is refused",
    "--base_weights": "it built the model with the step-0 head only, which a step-0 model has anyway",
}
# PLOP's experimental options, which none of its scripts uses and which would change the numbers:
# not implemented, refused with one line.
PLOP_EXPERIMENTAL_OPTIONS = (
    "--lr_old", "--ce_on_pseudo", "--pseudo_soft", "--pseudo_soft_factor", "--pseudo_ablation",
    "--kd_new", "--kd_mask", "--kd_mask_adaptative_factor", "--kd_scheduling", "--temperature",
    "--temperature_apply", "--temperature_semiold", "--exkd_gt", "--exkd_sum", "--kd_bce_sig",
    "--kd_bce_sig_shape", "--pod_large_logits", "--pod_deeplab_mask", "--pod_deeplab_mask_factor",
    "--deeplab_mask_downscale", "--cosine", "--nca", "--nca_margin", "--nb_background_modes",
    "--multimodal_fusion", "--init_multimodal", "--align_weight", "--align_weight_frequency",
    "--entropy_min", "--sample_weights_new", "--focal_loss", "--focal_loss_new", "--focal_loss_gamma",
    "--ce_on_new", "--disable_background",
)

DEBUG_ENV = "SEGMENTATION_DEBUG"

AMP_MODES = ("off", "fp16", "bf16")
OPT_LEVEL_TO_AMP = {"O0": "off", "O1": "fp16", "O2": "fp16", "O3": "fp16"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for on/off flags, options without a default and help that has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


# The end of every usage error train.py prints.
HELP_POINTER = " (train.py --help lists every option)"


class _Parser(argparse.ArgumentParser):
    """Raises ``UsageError`` for a wrong option instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``train.py`` argument parser (no presets or validation: see :func:`parse_options`)."""
    parser = _Parser(
        prog="train.py",
        usage="train.py [options], e.g. train.py --dataset voc --task 15-5 --step all --method MiB",
        description="Class-incremental semantic segmentation (MiB and baselines): train and/or "
        "test one or more incremental steps.",
        formatter_class=_HelpFormatter,
        # A typo such as --epoch must not silently set --epochs (or, later, another option).
        allow_abbrev=False,
    )

    data = parser.add_argument_group("data")
    data.add_argument("--data_root", default="data",
                      help="folder holding PascalVOC12/, ADEChallengeData2016/, cityscapes/ or the synthetic "
                      "sets (for cityscapes_domain it may also be the Cityscapes folder itself, as in PLOP's "
                      "scripts)")
    data.add_argument("--dataset", default="voc", choices=DATASETS,
                      help="'synthetic' is a small generated VOC-like dataset (written under "
                      "<data_root>/SyntheticVOC on first use) so the quickstart needs no download; "
                      "'cityscapes_domain' is PLOP's domain-incremental Cityscapes (tasks 11-5, 11-1, 1-1: "
                      "new cities, the same 19 classes), 'synthetic_domain' its generated stand-in "
                      "(<data_root>/SyntheticCityscapes)")
    data.add_argument("--domain_split", default="per_city", choices=DOMAIN_SPLIT_MODES,
                      help="domain-incremental datasets: 'per_city' holds out 20%% of each city for "
                      "validation and test (no test image is ever trained on); 'plop' is the original "
                      "code's split, whose test sets from step 1 on hold images trained on")
    data.add_argument("--allow_synthetic_in_data_root", action="store_true",
                      help="write SyntheticVOC/ even into a --data_root that holds a real dataset")
    data.add_argument("--allow_regenerated_splits", action="store_true",
                      help="ADE 50-50 (50, 50b, 50-50) without --split_dir: compute splits that "
                      "differ from the original's (which cannot be regenerated)")
    data.add_argument("--split_dir", default=None,
                      help="folder of existing split index files, e.g. the original code's data/voc/15-5 "
                           "(default: computed once, cached under <dataset>/incremental-splits/)")
    data.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")

    task = parser.add_argument_group("incremental task")
    task.add_argument("--task", default="19-1", help="task name, e.g. 19-1, 15-5, 15-1, 100-50")
    task.add_argument("--step", nargs="+", default=["0"],
                      help="steps to run: one step (1), several (0 1 2 or 0,1,2) or 'all' (default: 0)")
    task.add_argument("--overlap", "--overlapped", dest="overlap", action="store_true",
                      help="overlapped setting (default: disjoint)")
    task.add_argument("--no_mask", action="store_true",
                      help="training labels keep the old classes (default: old classes become "
                      "background, as the protocol says)")
    task.add_argument("--label_protocol", default=None, choices=LABEL_PROTOCOLS,
                      help="label mapping. mib: void pixels are background in training; old and future "
                      "classes and ADE's 'other' (0) are ignored in validation, future classes and 'other' "
                      "in the test. plop: void pixels are ignored in training; old and future classes and "
                      "'other' are background in validation, future classes and 'other' in the test (so "
                      "ADE's class 0 is scored). Default: plop when PLOP's --pod or --pseudo is set, else mib")
    task.add_argument("--data_masking", default="current", choices=DATA_MASKINGS,
                      help="PLOP's masking of the VOC training and validation labels (--label_protocol "
                      "plop): current (the protocol), current+old (old classes keep their label: an "
                      "oracle) or new (every class but the background and the step's ignored); ADE "
                      "ignores it")
    task.add_argument("--ignore_test_bg", action="store_true",
                      help="ADE: ignore 'other' (0) and the future classes in the test instead of scoring "
                      "them as background (PLOP's option; the mib label protocol always ignores them)")

    method = parser.add_argument_group(
        "method and losses",
        "A --method preset fills in the loss options below that are not given explicitly; the options "
        "combine as in the original command line.")
    method.add_argument("--method", default=None,
                        help="preset, case-insensitive: " + ", ".join(method_names()))
    method.add_argument("--freeze", action="store_true", help="do not train the backbone")
    for owner in methods_option_owners():
        owner.add_options(method)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, nargs="+", default=[0.007],
                       help="base learning rate (default: 0.007), or one per selected step as in "
                       "PLOP; protocol: 0.01 at step 0, 0.001 later")
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
    perf.add_argument("--dtype", default="float32", choices=DTYPES,
                      help="floating-point type of the whole model, inputs, norm statistics and losses; "
                      "float64 exists to test and debug numerics (not with --amp)")
    perf.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    perf.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="auto = cuda when available")
    perf.add_argument("--norm_kernels", default="auto", choices=NORM_KERNELS,
                      help="In-Place ABN's arithmetic: fused = compiled kernels (torch.compile), reference = "
                      "the PyTorch operations as written (the escape hatch if a GPU's compiled kernels fail); "
                      "auto = fused on CUDA, reference elsewhere. Does not change results beyond rounding")
    perf.add_argument("--tf32", default="on", choices=("on", "off"),
                      help="TF32 tensor cores for float32 convolutions and matrix products on CUDA "
                      "(Ampere and newer); off = true float32")

    ckpt = parser.add_argument_group("checkpoints and resuming")
    ckpt.add_argument("--checkpoint_dir", "--checkpoint", dest="checkpoint_dir", default="checkpoints",
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
    ckpt.add_argument("--overwrite", action="store_true",
                      help="replace the files of an earlier run under the same --name whose "
                      "options differ (default: refuse)")
    ckpt.add_argument("--max_bad_iterations", type=int, default=0,
                      help="skip up to N iterations whose loss or gradient is NaN/Inf (with a "
                      "warning each) instead of stopping at the first")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--test", action="store_true", help="skip training, only test")
    evaluation.add_argument("--val_interval", type=int, default=1, help="validate every N epochs")
    evaluation.add_argument("--cross_val", action="store_true",
                            help="validate on a held-out random 20%% of the step's training images "
                            "(trained on the other 80%%) instead of the val split")
    evaluation.add_argument("--test_on_val", action="store_true",
                            help="PLOP's option (VOC): in an order shuffled with seed 1, train on the first "
                            "80%% of the step's training images and test on the last 20%% of its test "
                            "images (the first 80%% with --val_on_trainset); validation keeps every val "
                            "image, so this is not the thesis' validation on 20%% of the training set")
    evaluation.add_argument("--val_on_trainset", action="store_true",
                            help="run the final test on the training images of the seen classes "
                            "instead of the val split")
    evaluation.add_argument("--eval_full_image", "--crop_val", dest="eval_full_image",
                            action="store_true",
                            help="evaluate full-resolution images (batch 1) instead of the "
                            "resize + centre crop of the protocol; --crop_val is the reference's "
                            "name for the same thing")

    logging_ = parser.add_argument_group("logging")
    logging_.add_argument("--name", default="Experiment", help="run name (logs and checkpoints)")
    logging_.add_argument("--logdir", default="logs",
                          help="logs go to <logdir>/<dataset>-<task>[-ov]/<name>/")
    logging_.add_argument("--no-visualize", dest="visualize", action="store_false",
                          help="do not write TensorBoard event files (written by rank 0 by default)")
    logging_.add_argument("--no_visualize", dest="visualize", action="store_false",
                          help=argparse.SUPPRESS)
    logging_.add_argument("--visualize", dest="visualize_flag", action="store_true",
                          help=argparse.SUPPRESS)
    logging_.add_argument("--debug", action="store_true",
                          help=f"show the Python traceback of an error (or set {DEBUG_ENV}=1)")
    logging_.add_argument("--sample_num", type=int, default=0,
                          help="sample predictions logged to TensorBoard as images (image | ground truth | "
                          "prediction) at every validation and test")
    logging_.add_argument("--print_interval", type=int, default=10,
                          help="iterations between loss logs")

    dist = parser.add_argument_group(
        "distributed",
        "Launch with torchrun (or srun under SLURM); the rank comes from the environment.")
    dist.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                      help="accepted for torch.distributed.launch command lines and ignored")
    dist.add_argument("--dist_backend", default="auto", choices=("auto", "nccl", "gloo"),
                      help="process-group backend: auto = nccl on CUDA, gloo on the CPU; gloo on CUDA lets "
                      "several processes share one GPU (slower; for tests on a one-GPU machine)")
    dist.add_argument("--collective_timeout", type=float, default=300.0,
                      help="seconds a process waits for the others (or for a data-loader worker) "
                      "before the run stops with an error naming what it waited for")

    # PLOP options that change nothing here: accepted, noted in the log, not shown in --help.
    for flag in PLOP_IGNORED_OPTIONS:
        parser.add_argument(flag, dest=_ignored_dest(flag), default=None, help=argparse.SUPPRESS)
    for flag in PLOP_IGNORED_FLAGS:
        parser.add_argument(flag, dest=_ignored_dest(flag), action="store_true", help=argparse.SUPPRESS)
    return parser


def _ignored_dest(flag: str) -> str:
    return "ignored_" + flag.strip("-").replace("-", "_")


def _explicit_options(argv: List[str]) -> Set[str]:
    """Destinations of the options given on the command line."""
    parser = build_parser()
    # With every default suppressed, the namespace holds exactly the options that were given.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _refuse_plop_experimental_options(argv: List[str]) -> None:
    given = [token.split("=", 1)[0] for token in argv if token.split("=", 1)[0] in PLOP_EXPERIMENTAL_OPTIONS]
    if given:
        raise UsageError(
            f"PLOP's experimental options, which none of its scripts uses, are not implemented here: "
            f"{', '.join(dict.fromkeys(given))}; remove them")


def _normalise_method(method: Optional[str]) -> Optional[str]:
    if method is None:
        return None
    found = find_method(method)
    if found is None:
        raise UsageError(f"--method {method}: unknown method; available methods: {', '.join(method_names())}")
    return found.name


def apply_preset(method: Optional[str], task: str, values: Dict[str, Any],
                 explicit: Set[str]) -> Dict[str, object]:
    """Set the preset's options that were not given explicitly in ``values``; returns what it set."""
    if method is None:
        return {}
    preset = method_preset(method, task, tasks.is_domain_incremental(values["dataset"]))
    filled = {name: value for name, value in preset.items() if name not in explicit}
    values.update(filled)
    return filled


def preset_note(method: Optional[str], task: str, filled: Dict[str, object]) -> Optional[str]:
    """One log line saying which values ``--method`` filled in (None when it filled none)."""
    if not filled:
        return None
    parts = []
    for name, value in filled.items():
        part = f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
        parts.append(part + find_method(method).preset_note(task, name, value))
    return f"{method} preset filled in: " + ", ".join(parts)


def _resolve_steps(dataset: str, task: str, step_args: List[str]) -> List[int]:
    step = ",".join(part.strip() for part in step_args)
    try:
        total = tasks.num_steps(dataset, task)
    except ValueError as error:
        raise UsageError(f"--task {task}: {error}") from None
    valid = f"valid steps of {dataset} {task}: 0..{total - 1} or 'all'"
    if step.lower() == "all":
        return list(range(total))
    try:
        steps = [int(part) for part in step.split(",")]
    except ValueError:
        raise UsageError(f"--step {' '.join(step_args)}: not a step, a list of steps or 'all'; {valid}") from None
    for value in steps:
        if not 0 <= value < total:
            raise UsageError(f"--step {' '.join(step_args)}: step {value} does not exist; {valid}")
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        raise UsageError(f"--step {' '.join(step_args)}: steps must be given in increasing order")
    return steps


def _resolve_lr(values: List[float], incremental_lr: Optional[float],
                steps: List[int]) -> Tuple[float, Optional[float]]:
    """``--lr`` with one value per step becomes (step 0's learning rate, the later steps')."""
    if len(values) == 1:
        return values[0], incremental_lr
    shown = " ".join(f"{value:g}" for value in values)
    if len(values) != len(steps):
        raise UsageError(f"--lr {shown}: give one learning rate, or one per step of --step "
                         f"({len(steps)} steps: {steps})")
    if incremental_lr is not None:
        raise UsageError(f"--lr {shown} already gives the learning rate of each step; drop --incremental_lr")
    per_step = dict(zip(steps, values))
    later = {value for step, value in per_step.items() if step > 0}
    if len(later) > 1:
        raise UsageError(f"--lr {shown}: the steps after step 0 must share one learning rate in one "
                         "launch; run steps with other learning rates separately")
    return per_step.get(0, values[0]), (later.pop() if later else None)


def _resolve_amp(amp: Optional[str], opt_level: Optional[str]) -> str:
    if opt_level is None:
        return amp or "off"
    from_level = OPT_LEVEL_TO_AMP[opt_level]
    if amp is not None and amp != from_level:
        raise UsageError(f"--amp {amp} conflicts with --opt_level {opt_level} (= --amp {from_level}); "
                         "give only one of them")
    return from_level


def _resolve_pretrained(values: Dict[str, Any]) -> Optional[str]:
    """The ImageNet weights a step-0 model starts from (checked by ``checks.check_options``)."""
    if values["no_pretrained"]:
        if values["pretrained"] is not None:
            raise UsageError("--pretrained and --no_pretrained contradict each other; give one")
        return None
    if values["pretrained"] is not None:
        return values["pretrained"]
    # ImageNet weights only matter when a step-0 model is trained; later steps and --test
    # start from a checkpoint.
    if values["dataset"] in ("synthetic", "synthetic_domain") or values["test"] or 0 not in values["steps"]:
        return None
    return pretrained_default_path(values["backbone"])


def _compatibility_notes(values: Dict[str, Any]) -> List[str]:
    """Refuses the original's ``--visualize`` and ``--base_weights`` beyond step 0; notes for the
    PLOP options that are ignored (and removes all of them from ``values``)."""
    if values.pop("visualize_flag"):
        raise UsageError("--visualize: in the original MiB/PLOP code this flag turned TensorBoard off; "
                         "TensorBoard is on by default here, pass --no-visualize to turn it off")
    if values["ignored_base_weights"] and values["steps"] != [0]:
        raise UsageError(f"--base_weights: PLOP's model with the step-0 head only cannot learn or score the "
                         f"classes of steps {[step for step in values['steps'] if step > 0]}; it is accepted "
                         "at step 0 only, where it changes nothing")
    notes = []
    for flag, why in PLOP_IGNORED_OPTIONS.items():
        value = values.pop(_ignored_dest(flag))
        if value is not None:
            notes.append(f"{flag} {value}: a PLOP option that changes nothing here ({why}); ignored")
    for flag, why in PLOP_IGNORED_FLAGS.items():
        if values.pop(_ignored_dest(flag)):
            notes.append(f"{flag}: a PLOP option that changes nothing here ({why}); ignored")
    return notes


def _resolve_labels(values: Dict[str, Any]) -> List[str]:
    """``--label_protocol`` when not given (plop when PLOP's ``--pod`` or ``--pseudo`` is set, after
    the preset, else mib) and ``--data_masking`` (ADE ignores it); returns the notes to log."""
    if tasks.is_domain_incremental(values["dataset"]):
        notes = [f"--{name} {values[name]}: ignored on --dataset {values['dataset']} (no background, no class "
                 "masking: every step labels the same 19 classes)"
                 for name, default in (("label_protocol", None), ("data_masking", "current"))
                 if values[name] != default]
        values["label_protocol"], values["data_masking"] = "mib", "current"
        return notes
    notes = []
    if values["label_protocol"] is None:
        # Options of the PLOP method (segmentation/methods/plop.py), hence ``get``.
        plop = [f"--{name} {values[name]}" for name in ("pod", "pseudo") if values.get(name) is not None]
        values["label_protocol"] = "plop" if plop else "mib"
        if plop:
            notes.append(f"--label_protocol plop (PLOP's label mapping) chosen with {' and '.join(plop)}; "
                         "pass --label_protocol mib for MiB's")
    if values["data_masking"] == "all":
        raise UsageError("--data_masking all: not implemented (the original raised NotImplementedError); "
                         "use current, current+old or new")
    if values["dataset"] == "ade" and values["data_masking"] != "current":
        notes.append(f"--data_masking {values['data_masking']}: PLOP's masking of VOC labels; ignored on ade, "
                     "as in the original")
        values["data_masking"] = "current"
    return notes


def debug_requested(argv: Optional[List[str]] = None) -> bool:
    """Whether tracebacks were asked for (``--debug`` or the environment variable)."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def parse_options(argv: Optional[List[str]] = None) -> Config:
    """Parse ``argv`` (default ``sys.argv[1:]``), apply the method preset, resolve and check.

    A wrong option raises ``UsageError``, a missing file or folder ``SetupError`` (one message
    naming the option or file; ``--help`` exits as argparse does). ``config.notes`` holds lines to
    log: the values a preset filled in, ignored PLOP options, the label protocol chosen by default.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    _refuse_plop_experimental_options(argv)
    values = vars(build_parser().parse_args(argv))
    explicit = _explicit_options(argv)

    values["method"] = _normalise_method(values["method"])
    filled = apply_preset(values["method"], values["task"], values, explicit)
    values["steps"] = _resolve_steps(values["dataset"], values["task"], values.pop("step"))
    notes = _compatibility_notes(values) + _resolve_labels(values)
    values["lr"], values["incremental_lr"] = _resolve_lr(values["lr"], values["incremental_lr"], values["steps"])
    values["amp"] = _resolve_amp(values["amp"], values.pop("opt_level"))
    values["pretrained"] = _resolve_pretrained(values)
    if not values["visualize"]:
        values["sample_num"] = 0  # images are only logged to TensorBoard
    note = preset_note(values["method"], values["task"], filled)
    config = Config.from_values(values, ([note] if note else []) + notes)
    check_options(config)
    return config
