"""Every check of a run's configuration, before anything is trained.

Each failed check raises ``UsageError`` (a wrong option value: change the command line, exit code
2) or ``SetupError`` (a file or folder is missing, unreadable or unwritable, exit code 1), with
one message that names the option or file and says what to do.

- ``check_options(config)`` runs while the command line is parsed: the values, and the files and
  folders the options name. It needs no torch, so usage errors answer at once.
- ``run_checks(config, files)`` runs on every rank once the processes have joined: what needs the
  process count, torch or the run's folders (the torch version, the backbone, the batch against the
  normalisation, the checkpoints a step starts from, the ImageNet weights, the same-name check of
  ``RunFiles``). It gathers the outcome of every rank, so that all ranks stop together with the same
  error. Rank 0 downloads torchvision's ImageNet weights (``--pretrained torchvision``) while the
  others wait; then every rank reads them from torch hub's cache.
"""
from __future__ import annotations

import http.client
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from segmentation import tasks
from segmentation.config import Config
from segmentation.domain_tasks import CITYSCAPES_DIR, SYNTHETIC_DOMAIN_DIR, cityscapes_folder
from segmentation.errors import SetupError, UsageError
from segmentation.methods import active_methods, methods_option_owners, non_negative_options

if TYPE_CHECKING:
    from segmentation.engine.run_files import RunFiles

# ADE tasks whose original training splits came from a balancing notebook whose seed was lost
# and cannot be reproduced: the disjoint filter computes other splits. Step sizes of the original files.
ADE_BALANCED_SPLITS: Dict[str, List[int]] = {
    "50": [8219, 6384, 5593], "50-50": [8219, 6384, 5593], "50b": [6659, 7483, 6054],
}

# Folder of each dataset under --data_root (as segmentation.data.readers.DATASET_DIRS, which
# imports torch; the option checks must not).
DATASET_FOLDERS = {"voc": "PascalVOC12", "ade": "ADEChallengeData2016", "synthetic": "SyntheticVOC",
                   "cityscapes_domain": CITYSCAPES_DIR, "synthetic_domain": SYNTHETIC_DOMAIN_DIR}
SYNTHETIC_DATASETS = ("synthetic", "synthetic_domain")

# What a method option would do on a domain-incremental task (the same 19 classes at every step,
# no background): PLOP's code let these run and crash or train on nothing (plop-spec §13.8).
DOMAIN_REFUSED_OPTIONS = {
    "unce": "every class is old, so MiB's unbiased cross-entropy is identically 0",
    "unkd": "no class is new, so MiB's unbiased distillation has no new channel to fold into the background",
    "init_balanced": "there is no background classifier to initialise new classes from (and no new class)",
    "pseudo": "every labelled pixel would count as background, so pseudo-labels would replace the ground truth",
}
DOMAIN_REFUSED_ENGINE_OPTIONS = {
    "no_mask": "no class is masked on these datasets",
    "test_on_val": "the held-out images are chosen by --domain_split",
    "val_on_trainset": "the held-out images are chosen by --domain_split",
    "split_dir": "the images of a step are chosen by city (--domain_split), not by split files",
}


# The oldest torch the code runs on (torch.nn.utils.get_total_norm came with 2.6). setup.py's
# install_requires says the same; tests/test_requirements.py compares the two and lists the features.
MIN_TORCH_VERSION = (2, 6)


def pretrained_default_path(backbone: str) -> str:
    """Where the reference looks for the In-Place ABN ImageNet weights (relative to the cwd)."""
    return os.path.join("pretrained", f"{backbone}_iabn_sync.pth.tar")


# ---------------------------------------------------------------------------- while parsing
def check_options(config: Config) -> None:
    """The option values and the files and folders they name (no torch, no process group)."""
    _check_ranges(config)
    _check_method_options(config)
    _check_label_options(config)
    _check_domain_options(config)
    _check_step_checkpoints(config)
    _check_ade_splits(config)
    _check_data_root(config)
    _check_pretrained_file(config)


def _check_ranges(config: Config) -> None:
    positive = ("lr", "epochs", "batch_size", "crop_size", "val_interval", "print_interval",
                "pooling", "lr_decay_step", "lr_power", "lr_decay_factor", "collective_timeout")
    if config.incremental_lr is not None and config.incremental_lr <= 0:
        raise UsageError(f"--incremental_lr must be positive, got {config.incremental_lr}")
    for name in positive:
        if getattr(config, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(config, name)}")
    for name in ("num_workers", "ckpt_interval", "sample_num", "weight_decay", "max_bad_iterations"):
        if getattr(config, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(config, name)}")
    for name in sorted(non_negative_options()):
        if config.methods[name] < 0:
            raise UsageError(f"--{name} must be >= 0, got {config.methods[name]}")
    if not 0 <= config.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {config.momentum}")
    if not 0 <= config.random_seed < 2 ** 32:
        raise UsageError(f"--random_seed must be in 0..{2 ** 32 - 1}, got {config.random_seed}")
    smallest_crop = 2 * config.output_stride
    if config.crop_size < smallest_crop:
        raise UsageError(f"--crop_size {config.crop_size} is too small for --output_stride "
                         f"{config.output_stride}: the feature map would be under 2x2; use at least "
                         f"{smallest_crop} (the protocol uses 512)")


def _check_method_options(config: Config) -> None:
    for owner in methods_option_owners():
        error = owner.check_options(config)
        if error:
            raise UsageError(error)
    if config.dtype == "float64" and config.amp != "off":
        raise UsageError(f"--dtype float64 cannot be combined with --amp {config.amp}; use one of them")


def _check_label_options(config: Config) -> None:
    if config.data_masking != "current" and config.label_protocol != "plop":
        raise UsageError(f"--data_masking {config.data_masking} is PLOP's label masking: it needs "
                         f"--label_protocol plop (got {config.label_protocol})")
    if config.data_masking == "new" and config.no_mask:
        raise UsageError("--data_masking new ignores the old classes, --no_mask keeps them; give one of them")
    if config.ignore_test_bg and config.dataset != "ade":
        raise UsageError(f"--ignore_test_bg applies to ADE's test labels; --dataset {config.dataset} has no "
                         "'other' label (its void pixels are always ignored in the test)")
    if config.test_on_val and config.dataset == "ade":
        raise UsageError("--test_on_val is PLOP's VOC option (the original ignored it on ADE); not with --dataset ade")


def _check_domain_options(config: Config) -> None:
    if not tasks.is_domain_incremental(config.dataset):
        return
    where = f"on --dataset {config.dataset}"
    for option, why in DOMAIN_REFUSED_OPTIONS.items():
        if config.methods[option]:
            raise UsageError(f"--{option} {where}: {why}. The domain presets of --method MiB and --method PLOP "
                             "leave it off (README, 'Domain-incremental tasks')")
    for option, why in DOMAIN_REFUSED_ENGINE_OPTIONS.items():
        if getattr(config, option):
            raise UsageError(f"--{option} {where}: {why}")
    if any(method.name == "LWF-MC" for method in active_methods(config)):
        raise UsageError(f"LwF-MC {where}: its targets for the old classes come from the old model, and every "
                         "class is old, so the ground truth would never be used")


def _check_step_checkpoints(config: Config) -> None:
    if config.ckpt is not None and len(config.steps) > 1:
        raise UsageError(f"--ckpt belongs to one step, but --step selects steps {list(config.steps)}")
    if config.step_ckpt is not None and len(config.steps) > 1:
        raise UsageError(f"--step_ckpt belongs to one step, but --step selects steps {list(config.steps)}")
    if config.step_ckpt is not None and config.steps == (0,):
        raise UsageError("--step_ckpt is the checkpoint of the previous step; step 0 has none")
    for option in ("step_ckpt", "ckpt"):
        path = getattr(config, option)
        if path is not None and not os.path.isfile(path):
            raise SetupError(f"--{option} {path}: file not found")


def _check_ade_splits(config: Config) -> None:
    if (config.dataset != "ade" or config.task not in ADE_BALANCED_SPLITS or config.overlap
            or config.split_dir is not None or config.allow_regenerated_splits):
        return
    raise SetupError(
        f"--task {config.task} on ade: the original's training splits of this task were balanced by "
        "hand (768 of the 8,219 step-0 images hold a class above 100) and cannot be regenerated. "
        f"Download the folder data/ade/{config.task.split('-')[0]} of the original MiB repository "
        "(github.com/fcdl94/MiB) and pass it as --split_dir, or pass --allow_regenerated_splits "
        "to train on splits computed by the disjoint filter (not the protocol)")


def _check_data_root(config: Config) -> None:
    folder = os.path.join(config.data_root, DATASET_FOLDERS[config.dataset])
    if config.dataset == "cityscapes_domain":
        if not os.path.isdir(cityscapes_folder(config.dataset, config.data_root)):
            raise SetupError(
                f"--dataset cityscapes_domain: no Cityscapes at {config.data_root} (no leftImg8bit/ there) nor at "
                f"{folder}. Point --data_root at the folder holding leftImg8bit/ and gtFine/ (the unpacked "
                "leftImg8bit_trainvaltest and gtFine_trainvaltest archives) or at its parent with the folder "
                "named cityscapes/, or run --dataset synthetic_domain, which needs no download")
        return
    if config.dataset not in SYNTHETIC_DATASETS:
        if not os.path.isdir(folder):
            raise SetupError(
                f"--dataset {config.dataset}: no dataset at {folder}. Put the data there (or point "
                f"--data_root at the folder holding {DATASET_FOLDERS[config.dataset]}/; the README's "
                "'Datasets' section says how), or run --dataset synthetic, which needs no download")
        return
    real = [name for key, name in DATASET_FOLDERS.items()
            if key not in SYNTHETIC_DATASETS and os.path.isdir(os.path.join(config.data_root, name))]
    if real and not os.path.isdir(folder) and not config.allow_synthetic_in_data_root:
        raise UsageError(
            f"--dataset {config.dataset} would write {DATASET_FOLDERS[config.dataset]}/ (hundreds of files) into "
            f"--data_root {config.data_root}, which holds the real dataset {real[0]}/; give the synthetic "
            "data a folder of its own (e.g. --data_root data/synthetic), or pass "
            "--allow_synthetic_in_data_root to write it there anyway")


def _check_pretrained_file(config: Config) -> None:
    if config.pretrained in (None, "torchvision") or os.path.isfile(config.pretrained):
        return
    if config.pretrained == pretrained_default_path(config.backbone):
        raise SetupError(
            f"ImageNet weights not found at {config.pretrained}. Download the In-Place ABN ImageNet "
            f"checkpoint of {config.backbone} (mapillary/inplace_abn, '{config.backbone} InPlace-ABN "
            f"sync') and save it as {config.pretrained}, or pass --pretrained torchvision to use "
            "torchvision's weights, or --no_pretrained to train from scratch")
    raise SetupError(f"--pretrained {config.pretrained}: file not found "
                     "(give an existing checkpoint, 'torchvision' or --no_pretrained)")


# ---------------------------------------------------------------------------- before training
@dataclass
class CheckedRun:
    """What the checks before training found worth logging."""

    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def check_torch_version(version: Optional[str] = None) -> None:
    """The installed torch (or ``version``) is at least ``MIN_TORCH_VERSION``."""
    if version is None:
        import torch

        version = torch.__version__
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match.group(1)), int(match.group(2))) >= MIN_TORCH_VERSION:
        return
    floor = ".".join(map(str, MIN_TORCH_VERSION))
    raise SetupError(
        f"torch {version} is installed, but this code needs torch >= {floor}: install the tested versions "
        f"with pip install -r requirements.txt (or any torch >= {floor} with the torchvision of its release)")


def check_training(config: Config, world_size: int) -> List[str]:
    """The backbone and the batch against the normalisation; returns the methods' warnings."""
    from segmentation.models.resnet import RESNET_LAYOUTS

    if config.backbone not in RESNET_LAYOUTS:
        raise UsageError(f"--backbone {config.backbone}: unknown backbone; valid: {', '.join(RESNET_LAYOUTS)}")
    if config.test:
        return []
    if config.norm_act == "iabn_sync" and config.batch_size * world_size < 2:
        raise UsageError(
            f"--batch_size {config.batch_size} with {world_size} process: batch normalisation needs "
            "at least 2 images per batch in all (it is synchronised over the processes); raise "
            "--batch_size (the protocol uses 24 in all)")
    if config.norm_act != "iabn_sync" and config.batch_size < 2:
        raise UsageError(
            f"--batch_size {config.batch_size} with --norm_act {config.norm_act}: normalisation is not "
            "synchronised, so each process needs at least 2 images; raise --batch_size or use "
            "--norm_act iabn_sync")
    return [warning for method in active_methods(config) for warning in method.launch_warnings(config)]


def _check_checkpoint(config: Config, option: str, path: str, step: int) -> Optional[str]:
    """The checkpoint ``option`` names fits ``step`` of the task; returns a note if it was converted."""
    from segmentation.engine import checkpoint
    from segmentation.engine.original_checkpoint import adapt_checkpoint

    try:
        ckpt = checkpoint.load_checkpoint(path, f"pass another {option}")
        ckpt, converted = adapt_checkpoint(ckpt, config.dataset, config.task, step, config.norm_act, Path(path))
        checkpoint.check_step_checkpoint(
            ckpt, config.dataset, config.task, step, tasks.classes_per_step(config.dataset, config.task, step), path)
    except (OSError, ValueError) as error:
        raise SetupError(f"{option} {path}: {error}") from error
    if option == "--ckpt" and not config.test and "optimizer_state" not in ckpt:
        raise UsageError(f"--ckpt {path}: not an in-step checkpoint (no optimizer state), so "
                         "training cannot resume from it; to test it add --test")
    if converted:
        return (f"{option} {path}: a checkpoint of the original MiB/PLOP code, converted "
                f"(classes per step {ckpt['classes']} match {config.task} step {step})")
    return None


def check_checkpoints(config: Config, checkpoint_dir: Path) -> List[str]:
    """The checkpoints the first step starts from (or ``--test`` evaluates) exist and fit the task;
    returns notes on checkpoints of the original code that were converted."""
    from segmentation.engine import checkpoint

    first = config.steps[0]
    notes: List[Optional[str]] = []
    if config.ckpt is not None:
        notes.append(_check_checkpoint(config, "--ckpt", config.ckpt, first))
    if config.test:
        for step in ([] if config.ckpt else config.steps):
            final = checkpoint.step_checkpoint_path(checkpoint_dir, step)
            if not final.is_file():
                raise SetupError(f"--test: the checkpoint of step {step}, {final}, does not exist; "
                                 "train the step first (same --name) or pass --ckpt <file>")
    elif first > 0 and not checkpoint.step_checkpoint_path(checkpoint_dir, first).is_file():
        if config.step_ckpt is not None:
            notes.append(_check_checkpoint(config, "--step_ckpt", config.step_ckpt, first - 1))
        else:
            previous = checkpoint.step_checkpoint_path(checkpoint_dir, first - 1)
            if not previous.is_file():
                raise SetupError(
                    f"--step {first}: it starts from the step {first - 1} model, {previous}, which does not "
                    f"exist; train step {first - 1} first (--step {first - 1}, same --name), use --step all, "
                    f"or pass --step_ckpt <checkpoint of step {first - 1}>")
    return [note for note in notes if note]


def fetch_pretrained(config: Config) -> None:
    """On rank 0, before the other ranks read it: put torchvision's ImageNet weights into torch hub's
    cache, downloading them unless they are there (when a step-0 model is trained with
    ``--pretrained torchvision``)."""
    if config.pretrained != "torchvision" or config.test or 0 not in config.steps:
        return
    from segmentation.models import fetch_torchvision_weights

    try:
        fetch_torchvision_weights(config.backbone)
    except (OSError, http.client.HTTPException) as error:  # urllib.error.URLError offline, a cut transfer
        raise _torchvision_weights_missing(config.backbone, f"and downloading them failed ({_first_line(error)})") \
            from error


def _torchvision_weights_missing(backbone: str, why: str) -> SetupError:
    from segmentation.models.pretrained import torchvision_weights_path, torchvision_weights_url

    path = torchvision_weights_path(backbone)
    return SetupError(
        f"--pretrained torchvision: torchvision's ImageNet weights of {backbone} are not in the torch hub cache, "
        f"{path}, {why}. Download {torchvision_weights_url(backbone)} on a machine with network access and "
        f"copy it to {path} (the torch hub cache is $TORCH_HOME/hub/checkpoints, by default "
        "~/.cache/torch/hub/checkpoints), or pass --pretrained <path> to a local weights file, or "
        "--no_pretrained to train from scratch")


def check_pretrained(config: Config) -> None:
    """The ImageNet weights load into the backbone (when a step-0 model is trained). With
    ``--pretrained torchvision``: the file ``fetch_pretrained`` put in torch hub's cache."""
    if config.pretrained is None or config.test or 0 not in config.steps:
        return
    from segmentation import distributed
    from segmentation.models import cached_torchvision_weights, load_imagenet_weights
    from segmentation.models.norm import norm_act_layer
    from segmentation.models.resnet import ResNet

    path = config.pretrained
    source = f"--pretrained {path}"
    remedy = "give the In-Place ABN or torchvision ImageNet weights of this backbone, or --no_pretrained"
    if config.pretrained == "torchvision":
        try:
            path = cached_torchvision_weights(config.backbone)
        except FileNotFoundError as error:
            if distributed.rank() > 0:
                why = ("on this machine, although rank 0 put them in its cache: on several machines, set "
                       "TORCH_HOME to a folder they share, or copy the file to each")
            else:
                why = "and fetch_pretrained did not download them"
            raise _torchvision_weights_missing(config.backbone, why) from error
        source = f"--pretrained torchvision: the cached file {path}"
        remedy = ("delete it, so that the next run downloads it again, or pass --pretrained <path> to a local "
                  "weights file, or --no_pretrained")
    body = ResNet(config.backbone, norm_act_layer(config.norm_act), config.output_stride)
    try:
        load_imagenet_weights(body, path)
    except (OSError, ValueError) as error:
        raise SetupError(f"{source}: {_first_line(error)}; {remedy}") from error
    except Exception as error:  # torch.load raises many types for foreign files
        raise SetupError(
            f"{source}: cannot be read as a weights file (truncated or not a checkpoint: "
            f"{type(error).__name__}); {remedy}") from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def run_checks(config: Config, files: "RunFiles") -> CheckedRun:
    """Run the checks before training on this rank (rank 0 also creates the run's folders and
    downloads torchvision's ImageNet weights if asked for), then stop every rank with the first
    failing rank's error, if any; on failure rank 0 removes the folders it created."""
    from segmentation import distributed

    checked = CheckedRun()
    error: Optional[Exception] = None
    try:
        check_torch_version()
        checked.warnings = check_training(config, distributed.world_size())
        files.create_folders()
        files.check_same_name()
        checked.notes = check_checkpoints(config, files.checkpoint_dir)
        if distributed.is_main_process():
            fetch_pretrained(config)
    except (UsageError, SetupError) as failed:
        error = failed
    # The other ranks wait here while rank 0 downloads; then every rank reads the weights file.
    waiting = "the checks before training"
    if config.pretrained == "torchvision":
        waiting += " (rank 0 may be downloading torchvision's weights: raise --collective_timeout on a slow network)"
    _stop_on_failure(error, files, waiting)
    try:
        check_pretrained(config)
    except (UsageError, SetupError) as failed:
        error = failed
    _stop_on_failure(error, files, "the check of the ImageNet weights")
    return checked


def _stop_on_failure(error: Optional[Exception], files: "RunFiles", what: str) -> None:
    """Raise the first failing rank's error on every rank (``error``: this rank's, or None)."""
    from segmentation import distributed

    outcomes = distributed.all_gather_object(None if error is None else (type(error).__name__, str(error)), what)
    failures = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if failures:
        files.remove_created()
        rank, (kind, message) = failures[0]
        where = f" (on rank {rank})" if distributed.world_size() > 1 and rank > 0 else ""
        raise (UsageError if kind == "UsageError" else SetupError)(message + where)
