"""Run a chain of incremental steps from parsed options: train, checkpoint, test, report.

For each step t of ``config.steps``:
1. If the step-final checkpoint ``step<t>.pth`` exists and loads, the step is not trained again
   (only tested if its results file is missing). A corrupt one is set aside and the step is
   retrained from its latest in-step checkpoint when there is one; otherwise the run stops.
2. Otherwise the datasets and models are built; at t > 0 the step t-1 checkpoint is checked
   against the task and loaded (the new head is the only missing part), the old model is built
   from it when a distillation loss needs it. Training resumes from the latest in-step
   checkpoint when one exists (unless ``--no_resume``); otherwise the methods' passes over the
   training set run first (e.g. PLOP's thresholds; a stopped one continues from
   ``step<t>-pass.pth``).
3. Rank 0 writes ``step<t>.pth`` atomically and reads it back; the model is then rebuilt from that file (never the
   weights in memory, which with the original's ``--test`` were not the trained ones), tested on the test split, and the results are written to
   ``<logdir>/<dataset>-<task>[-ov]/<name>/step<t>.json``.
A run holds the lock of its checkpoint folder (a second launch of the same run is refused) and
first removes the temporary files a killed write left there. With ``--test`` only the test runs, on ``--ckpt`` or the step-final checkpoint, and the results go
to ``eval-step<t>.json`` so that the training results are kept.

What the user reads, in the run's log folder (rank 0): ``train.log``, the console's lines,
appended by every launch once the checks before training passed; with TensorBoard,
``step<t>/`` (training and validation of step t, x = iteration or epoch) and ``test/`` (the test
of every step, x = the step, so the scores draw curves over the steps; ``eval/`` for ``--test``).
"""
from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from segmentation import distributed, tasks
from segmentation.config import Config
from segmentation.data import CLASS_NAMES, build_dataset
from segmentation.data.cityscapes import build_domain_dataset
from segmentation.data.dataset import held_out_split
from segmentation.data.protocol import label_fates
from segmentation.data.palette import colorize
from segmentation.data.readers import label_family, list_name_for_split
from segmentation.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from segmentation.domain_tasks import CITY_NAMES
from segmentation.engine import checkpoint
from segmentation.engine.backends import configure_backends
from segmentation.engine.checks import ADE_BALANCED_SPLITS, run_checks
from segmentation.engine.evaluation import build_eval_loader, evaluate
from segmentation.engine.logger import Logger
from segmentation.engine.optim import build_optimizer, build_scheduler
from segmentation.engine.original_checkpoint import adapt_checkpoint
from segmentation.engine.run_files import RunFiles
from segmentation.engine.sampler import GlobalBatchSampler
from segmentation.engine.trainer import Trainer, TrainingInterrupted
from segmentation.errors import UsageError
from segmentation.faults import fault_point
from segmentation.launch_env import read_env
from segmentation.metrics import segmentation_scores
from segmentation.signals import StopSignal
from segmentation.methods.step_methods import StepMethods, StepStart, step_methods
from segmentation.models import build_model

LOGGER = logging.getLogger(__name__)


def select_device(requested: str, local_rank: int, backend: str = "auto") -> torch.device:
    """``--device``: "cpu", "cuda" (error if unavailable) or "auto" (cuda when available); on CUDA the
    process's own GPU (``distributed.gpu_index``)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available; use --device cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", distributed.gpu_index(local_rank, torch.cuda.device_count(), backend))
    torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def model_dtype(config: Config) -> torch.dtype:
    """``--dtype`` as a torch dtype."""
    return getattr(torch, config.dtype)


def make_model(config: Config, classes: List[int], pretrained: Optional[str]) -> nn.Module:
    """The step model in ``--dtype`` (weights loaded later are cast to it)."""
    return build_model(
        classes,
        backbone=config.backbone,
        output_stride=config.output_stride,
        norm_act=config.norm_act,
        pretrained=pretrained,
        pooling_size=config.pooling,
    ).to(model_dtype(config))


def load_new_step_model(model: nn.Module, state: Dict[str, torch.Tensor], step: int, path: Path) -> None:
    """Load the step t-1 weights into the step t model: only the new head may be missing."""
    result = model.load_state_dict(state, strict=False)
    new_head = f"cls.{step}."
    unexpected_missing = [key for key in result.missing_keys if not key.startswith(new_head)]
    if unexpected_missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: the checkpoint does not fit the step {step} model: missing "
            f"{unexpected_missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def freeze(model: nn.Module) -> nn.Module:
    """The old model: eval mode (running statistics, no synchronisation) and no gradients."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def sample_image(image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Denormalised image | ground truth | prediction side by side, (3, H, 3W) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((image.detach().float().cpu() * std + mean).clamp(0, 1) * 255).to(torch.uint8)
    return torch.cat([rgb, colorize(label), colorize(prediction)], dim=2)


class StepRunner:
    """Runs one incremental step (train and/or test) for parsed options."""

    def __init__(self, config: Config, step: int, device: torch.device, files: RunFiles) -> None:
        self.config = config
        self.step = step
        self.device = device
        self.files = files
        self.classes = tasks.classes_per_step(config.dataset, config.task, step)
        self.old_classes = tasks.old_classes_per_step(config.dataset, config.task, step)
        self.num_channels = sum(self.classes)
        self.domain_incremental = tasks.is_domain_incremental(config.dataset)
        self.channel_order = tasks.channel_order(config.dataset, config.task, step)
        self.final_path = files.step_checkpoint(step)
        self.results_path = files.results(step)
        self.main = distributed.is_main_process()

    # ---------------------------------------------------------------- entry
    def run(self, stop_signal: Optional[StopSignal] = None) -> None:
        config = self.config
        if config.test:
            path = Path(config.ckpt) if config.ckpt else self.final_path
            if not path.is_file():
                raise FileNotFoundError(
                    f"--test: checkpoint {path} of step {self.step} does not exist; train the step "
                    "first or pass --ckpt <file>"
                )
            remedy = "pass another --ckpt" if config.ckpt else "train the step again (delete the file first)"
            self.test(path, report_training=False, saved=self._load_step_checkpoint(path, self.step, remedy))
            return
        saved = self._finished_step_checkpoint()
        if saved is not None:
            if self.results_path.is_file():
                LOGGER.info("step %d already finished (%s exists): skipped", self.step, self.final_path)
                return
            LOGGER.info("step %d already trained (%s exists): testing it", self.step, self.final_path)
        else:
            self.train(stop_signal)
        self.test(self.final_path, report_training=True, saved=saved)

    def _load_step_checkpoint(self, path: Path, step: int, remedy: str) -> Dict[str, Any]:
        """The verified checkpoint of ``step`` at ``path``, one of the original code converted to
        this code's layout (the pre-training checks logged that); ``CheckpointError`` with
        ``remedy`` if it is unreadable or does not fit the task."""
        config = self.config
        saved, _ = adapt_checkpoint(
            checkpoint.load_checkpoint(path, remedy), config.dataset, config.task, step, config.norm_act, path)
        classes = tasks.classes_per_step(config.dataset, config.task, step)
        checkpoint.check_step_checkpoint(saved, config.dataset, config.task, step, classes, path)
        return saved

    def _finished_step_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The verified ``step<t>.pth`` of a finished step, or None when the step must be trained.

        A corrupt file is renamed ``step<t>.pth.corrupt`` when the step's in-step checkpoints can
        train it again; without them the run stops with a ``CheckpointError``.
        """
        if not self.final_path.is_file():
            return None
        error: Optional[str] = None
        saved: Optional[Dict[str, Any]] = None
        try:
            saved = self._load_step_checkpoint(
                self.final_path, self.step,
                f"delete it (or restore it from a backup) and rerun the same command to train step "
                f"{self.step} again",
            )
        except checkpoint.CheckpointError as failure:
            error = str(failure)
        # Every rank read the file; rank 0's verdict decides for all.
        error = distributed.broadcast_object(error, what="the check of the step checkpoint")
        if error is None:
            self.files.clear_in_step(self.step)  # left by a run killed just after writing step<t>.pth
            return saved
        if not (self.config.resume and self.files.in_step(self.step).paths()):
            raise checkpoint.CheckpointError(error)
        LOGGER.warning("%s; step %d is trained again from its latest in-step checkpoint", error, self.step)
        self.files.set_aside_corrupt(self.final_path)
        return None

    # ---------------------------------------------------------------- models
    def _previous_checkpoint_path(self) -> Path:
        config = self.config
        if config.step_ckpt and self.step == config.steps[0]:
            return Path(config.step_ckpt)
        return self.files.step_checkpoint(self.step - 1)

    def _previous_checkpoint_remedy(self) -> str:
        if self.config.step_ckpt and self.step == self.config.steps[0]:
            return "pass another --step_ckpt"
        return (f"delete it (or restore it from a backup) and rerun with --step {self.step - 1} "
                f"(or --step all) to train step {self.step - 1} again")

    def _build_models(self, methods: StepMethods):
        """The current model (step t-1 weights loaded at t > 0, then changed by the methods), the
        old model when a method needs it, and the step t-1 checkpoint (None at step 0)."""
        config = self.config
        model = make_model(config, self.classes, config.pretrained if self.step == 0 else None)
        old_model = previous = None
        if self.step > 0:
            path = self._previous_checkpoint_path()
            previous = self._load_step_checkpoint(path, self.step - 1, self._previous_checkpoint_remedy())
            load_new_step_model(model, previous["model_state"], self.step, path)
            methods.initialize_weights(model)
            if methods.needs_old_model:
                old_model = make_model(config, self.old_classes, None)
                old_model.load_state_dict(previous["model_state"], strict=True)
                old_model = freeze(old_model).to(self.device)
                if config.channels_last:
                    old_model = old_model.to(memory_format=torch.channels_last)
        if config.freeze:
            # Not only out of the optimizer: no gradient is computed, all-reduced or kept for the body.
            model.body.requires_grad_(False)
        model = model.to(self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if config.fix_bn:
            model.fix_bn()
        return model, old_model, previous

    def _dataset(self, split: str, transform, domains: Optional[List[int]] = None):
        """The step's ``split``; for a domain-incremental dataset, of the images of ``domains`` only
        (None: every domain the split holds)."""
        config = self.config
        if self.domain_incremental:
            return build_domain_dataset(config.dataset, config.data_root, config.task, self.step, split, transform,
                                        seed=config.random_seed, split_mode=config.domain_split, domains=domains)
        return build_dataset(
            config.dataset,
            config.data_root,
            config.task,
            self.step,
            split,
            overlap=config.overlap if split == "train" else True,
            transform=transform,
            seed=config.random_seed,
            split_dir=config.split_dir,
            mask_old=not config.no_mask,
            images_from="train" if split == "test" and config.val_on_trainset else None,
            protocol=config.label_protocol,
            data_masking=config.data_masking,
            ignore_test_bg=config.ignore_test_bg,
            test_on_val=config.test_on_val,
        )

    def _eval_loader(self, dataset):
        batch_size = 1 if self.config.eval_full_image else self.config.batch_size
        return build_eval_loader(dataset, batch_size, self.config.num_workers, self.device)

    def _eval_transform(self):
        return eval_transform(self.config.crop_size, full_image=self.config.eval_full_image)

    @functools.cached_property
    def _test_set(self):
        """The test split of this step (built once: training describes it, the test uses it)."""
        return self._dataset("test", self._eval_transform())

    def _evaluation_sets(self, val_set, test_set) -> str:
        """One line: which images the validation and the test use, which classes they score, and
        how many images they share."""
        config = self.config
        if self.domain_incremental:
            return self._domain_evaluation_sets(val_set, test_set)
        step_classes = self.classes[-1] - (1 if self.step == 0 else 0)  # without the background
        names = {"old": "old classes", "future": "future classes", "other": "'other' (0)"}

        def beyond_classes(fates: Dict[str, str], say_ignored: bool) -> str:
            """The background when it is scored, the labels counted as background (PLOP's label
            protocol) and, if ``say_ignored``, whether other labels are ignored."""
            as_background = [names[group] for group, fate in fates.items() if fate == "background"]
            scored = label_family(config.dataset) == "voc" or fates.get("other") == "background"
            notes = []
            if as_background:
                *others, last = as_background
                notes.append(f"{', '.join(others) + ' and ' if others else ''}{last} counted as background")
            if say_ignored and "ignored" in fates.values():
                notes.append("the other classes ignored")
            return (" and the background" if scored else "") + (f" ({', '.join(notes)})" if notes else "")

        val_fates = label_fates(config.dataset, config.task, self.step, val_set.lut)
        if config.cross_val:
            fate = {"kept": "kept", "background": "as background", "ignored": "ignored"}.get(val_fates.get("old"))
            labels = f": old classes {fate}" if fate else ""
            val = (f"{len(val_set)} training images held out by --cross_val (not trained on; labelled as "
                   f"for training{labels})")
        else:
            classes = (f"the {self.num_channels - 1} classes seen so far" if val_fates.get("old") == "kept"
                       else "these classes")
            val = (f"{len(val_set)} images of the {list_name_for_split(config.dataset, 'val')!r} list that show "
                   f"one of this step's {step_classes} classes, scored on {classes}"
                   f"{beyond_classes(val_fates, say_ignored=True)}")
        test_list = list_name_for_split(config.dataset, "train" if config.val_on_trainset else "test")
        part = "first 80 %" if config.val_on_trainset else "last 20 %"
        cut = f" (--test_on_val: the {part} of them in a fixed shuffled order)" if config.test_on_val else ""
        test_fates = label_fates(config.dataset, config.task, self.step, test_set.lut)
        test = (f"{len(test_set)} images of the {test_list!r} list that show one of the "
                f"{self.num_channels - 1} classes seen so far{cut}, scored on all of them"
                f"{beyond_classes(test_fates, say_ignored=False)}")
        return f"step {self.step}: validation on {val}; test on {test}; {_shared_images(val_set, test_set)}"

    def _step_domains(self) -> Tuple[List[int], List[int]]:
        """The domain ids of the earlier steps and of this step."""
        config = self.config
        return (tasks.old_labels(config.dataset, config.task, self.step),
                tasks.labels_of_step(config.dataset, config.task, self.step))

    def _domain_evaluation_sets(self, val_set, test_set) -> str:
        old, new = self._step_domains()
        cities = ", ".join(f"{CITY_NAMES[domain]} ({domain})" for domain in new)
        held_out = {"per_city": "the held-out 20 % of each city (--domain_split per_city: never trained on)",
                    "plop": "the original's split (--domain_split plop: from step 1 on, most test images were "
                            "trained on at some step)"}[self.config.domain_split]
        return (f"step {self.step}: trains on {cities}; validation on {len(val_set)} images of this step's "
                f"cities, test on {len(test_set)} images of the {len(old) + len(new)} cities seen so far, both from "
                f"{held_out}, scored on the 19 classes; {_shared_images(val_set, test_set)}")

    def _domain_test(self, model: nn.Module) -> Tuple[Dict[str, Any], List[torch.Tensor], Dict[str, Any]]:
        """Scores on the test images of every city seen so far, from one pass over those of the old
        cities and one over those of this step's (their confusion matrices add up), samples, and the
        results entries of each group of cities."""
        old, new = self._step_domains()
        transform = self._eval_transform()
        matrix, samples, groups = None, [], {}
        for group, domains in (("old", old), ("new", new)):
            if not domains:
                groups[f"miou_{group}_domains"] = None
                continue
            test_set = self._dataset("test", transform, domains=domains)
            scores, group_samples = self._evaluate(model, self._eval_loader(test_set), "test")
            groups[f"miou_{group}_domains"] = scores["miou"]
            samples += group_samples
            matrix = scores["confusion_matrix"] if matrix is None else matrix + scores["confusion_matrix"]
        groups["old_domains"] = [CITY_NAMES[domain] for domain in old]
        groups["new_domains"] = [CITY_NAMES[domain] for domain in new]
        scores = dict(segmentation_scores(matrix))
        scores["confusion_matrix"] = matrix
        scores["miou_all"] = scores["miou"]
        for key in ("miou_old", "miou_new", "miou_all_fg", "miou_old_fg", "miou_new_fg", "hmean", "hmean_fg"):
            scores[key] = None  # class groups: every step has the same classes, and no background
        return scores, samples[:self.config.sample_num], groups

    def _evaluate(self, model: nn.Module, loader, fault: str,
                  num_old_channels: Optional[int] = None) -> Tuple[Dict[str, Any], List[torch.Tensor]]:
        """The scores of ``model`` on ``loader`` (``evaluate``) and, on rank 0, the sample images of
        its first ``--sample_num`` batches (their first image: image | ground truth | prediction)."""
        config = self.config
        samples: List[torch.Tensor] = []

        def on_batch(index: int, images, labels, predictions) -> None:
            fault_point(fault)
            if self.main and index < config.sample_num:
                samples.append(sample_image(images[0], labels[0], predictions[0]))

        scores = evaluate(
            model, loader, self.num_channels, self.device, config.amp, num_old_channels=num_old_channels,
            channels_last=config.channels_last, on_batch=on_batch,
        )
        return scores, samples

    # ---------------------------------------------------------------- training
    def train(self, stop_signal: Optional[StopSignal]) -> None:
        config = self.config
        seed_everything(config.random_seed)
        train_set = self._dataset("train", train_transform(config.crop_size))
        if config.dataset == "ade" and config.task in ADE_BALANCED_SPLITS and config.split_dir is None \
                and not config.overlap:
            LOGGER.warning(
                "step %d: regenerated %s split of %d training images; the original's has %d "
                "(--allow_regenerated_splits: not the protocol)",
                self.step, config.task, len(train_set), ADE_BALANCED_SPLITS[config.task][self.step])
        if config.cross_val:
            train_positions, val_positions = held_out_split(len(train_set), config.random_seed)
            val_set = train_set.subset(val_positions, self._eval_transform())
            train_set = train_set.subset(train_positions, train_set.transform)
        else:
            val_set = self._dataset("val", self._eval_transform())
        LOGGER.info("%s", self._evaluation_sets(val_set, self._test_set))
        methods = step_methods(config, self.step, num_old_channels=sum(self.old_classes),
                               num_channels=self.num_channels)
        model, old_model, previous = self._build_models(methods)
        methods.begin_step(StepStart(
            model=model, old_model=old_model, previous=previous,
            previous_path=str(self._previous_checkpoint_path()) if self.step > 0 else None,
            train_set=train_set, device=self.device,
        ))
        optimizer = build_optimizer(model, config, self.step)
        world_size = distributed.world_size()
        sampler = GlobalBatchSampler(
            len(train_set), config.batch_size, distributed.rank(), world_size, config.random_seed,
            drop_last=True,
        )
        if len(sampler) == 0:
            raise ValueError(
                f"step {self.step}: the training set has {len(train_set)} images, fewer than one "
                f"global batch ({config.batch_size} per process x {world_size} processes); lower "
                "--batch_size"
            )
        scheduler = build_scheduler(optimizer, config, len(sampler) * config.epochs)
        train_model: nn.Module = model
        if distributed.is_initialized() and world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=device_ids)

        logger = self.files.event_logger(f"step{self.step}")
        if not config.resume:
            self.files.clear_in_step(self.step)
        meta = {
            "dataset": config.dataset,
            "task": config.task,
            "overlap": config.overlap,
            "step": self.step,
            "classes": self.classes,
            "channel_order": self.channel_order,
            "options": config.as_dict(),
            "processes": world_size,
        }
        val_loader = self._eval_loader(val_set)

        def validate(epoch: int) -> None:
            last = epoch + 1 == config.epochs
            if (epoch + 1) % config.val_interval != 0 and not last:
                return
            with distributed.waiting_for(f"the validation of step {self.step} epoch {epoch + 1}"):
                self._validate(model, val_loader, logger, epoch + 1)

        trainer = Trainer(
            train_model,
            old_model,
            methods,
            optimizer,
            scheduler,
            train_set,
            sampler,
            device=self.device,
            epochs=config.epochs,
            num_workers=config.num_workers,
            seed=config.random_seed,
            amp=config.amp,
            channels_last=config.channels_last,
            fix_bn=config.fix_bn,
            checkpoints=self.files.in_step_writer(self.step),
            ckpt_interval=config.ckpt_interval,
            checkpoint_meta=meta,
            logger=logger,
            print_interval=config.print_interval,
            on_epoch_end=validate,
            stop_signal=stop_signal,
            dtype=model_dtype(config),
            max_bad_iterations=config.max_bad_iterations,
            loader_timeout=config.collective_timeout,
        )
        state = self._resume_state()
        if state is not None:
            written_by = trainer.resume(state)
            LOGGER.info("step %d: resumed from iteration %d (epoch %d of %d) on %d process(es)%s",
                        self.step, state["iteration"], trainer.epoch + 1, config.epochs, world_size,
                        f" (was {written_by})" if written_by != world_size else "")
        elif config.resume:
            LOGGER.info("step %d: no in-step checkpoint in %s: training starts at iteration 0",
                        self.step, self.files.checkpoint_dir)
        LOGGER.info(
            "step %d: %d training images, %d iterations per epoch, %d epochs, global batch %d",
            self.step, len(train_set), len(sampler), config.epochs, config.batch_size * world_size,
        )
        if state is None:  # an in-step checkpoint holds what the methods' passes computed
            trainer.run_data_passes(self.files.load_data_pass(self.step) if config.resume else None)
        trainer.train()

        final_state = {
            **meta,
            "model_state": model.state_dict(),
            "method": config.method,
            "method_states": methods.step_state(),
            "train_seconds": trainer.train_seconds,
            "train_images": trainer.images_seen,
        }
        self.files.save_step_checkpoint(
            final_state, self.step, lambda path: self._load_step_checkpoint(path, self.step, "the disk may be failing"))
        logger.close()

    def _resume_state(self) -> Optional[Dict[str, Any]]:
        config = self.config
        if config.ckpt:
            state = checkpoint.load_checkpoint(config.ckpt, "pass another --ckpt")
            source = Path(config.ckpt)
            if "optimizer_state" not in state:
                raise ValueError(
                    f"--ckpt {source}: not an in-step checkpoint (no optimizer state); to test a "
                    "step-final checkpoint use --test --ckpt"
                )
        elif config.resume:
            state = self.files.in_step(self.step).latest()
            source = self.files.checkpoint_dir / f"step{self.step}-iter*.pth"
            # Every rank reads the files itself; they must have picked the same one.
            picked = distributed.all_gather_object(
                None if state is None else state["iteration"], what="the choice of the in-step checkpoint"
            )
            if len(set(picked)) > 1:
                raise RuntimeError(
                    f"the processes found different in-step checkpoints in {self.files.checkpoint_dir} "
                    f"(iterations {picked}); is the folder shared by all nodes?"
                )
        else:
            return None
        if state is None:
            return None
        checkpoint.check_step_checkpoint(
            state, config.dataset, config.task, self.step, self.classes, source
        )
        return state

    def _validate(self, model: nn.Module, loader, logger: Logger, epoch: int) -> None:
        scores, samples = self._evaluate(model, loader, "validation")
        LOGGER.info(
            "step %d epoch %d validation: mIoU %s, overall acc %s",
            self.step, epoch, _percent(scores["miou"]), _percent(scores["overall_acc"]),
        )
        logger.scalar("val/miou", scores["miou"] or 0.0, epoch)
        logger.scalar("val/overall_acc", scores["overall_acc"] or 0.0, epoch)
        _log_evaluation(logger, "val", scores, self._class_names(), samples, epoch)

    # ---------------------------------------------------------------- test
    def _class_names(self) -> List[str]:
        names = CLASS_NAMES[self.config.dataset]
        return [names[label] for label in self.channel_order]

    def test(self, path: Path, report_training: bool, saved: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Evaluate the checkpoint at ``path`` (already loaded: ``saved``) on the test split and
        write the step's results file.

        ``report_training``: include the training time and speed stored in the checkpoint.
        """
        config = self.config
        if saved is None:
            saved = self._load_step_checkpoint(path, self.step, "train the step again (delete the file first)")
        model = make_model(config, self.classes, None)
        model.load_state_dict(saved["model_state"], strict=True)
        model = model.to(self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        test_set = self._test_set
        domain_groups: Dict[str, Any] = {}
        with distributed.waiting_for(f"the test of step {self.step}"):
            if self.domain_incremental:
                scores, samples, domain_groups = self._domain_test(model)
            else:
                scores, samples = self._evaluate(model, self._eval_loader(test_set), "test",
                                                 num_old_channels=self.classes[0])
        results = {
            "dataset": config.dataset,
            "task": config.task,
            "overlap": config.overlap,
            "step": self.step,
            "num_steps": tasks.num_steps(config.dataset, config.task),
            "method": config.method,
            "name": config.name,
            "checkpoint": str(path),
            "channel_order": self.channel_order,
            "class_names": self._class_names(),
            "class_iou": scores["class_iou"],
        }
        for key in ("miou_all", "miou_old", "miou_new", "miou_all_fg", "miou_old_fg", "miou_new_fg",
                    "hmean", "hmean_fg", "overall_acc", "mean_acc"):
            results[key] = scores[key]
        results.update(domain_groups)
        seconds = saved.get("train_seconds") if report_training else None
        images = saved.get("train_images") if report_training else None
        results["train_seconds"] = seconds
        results["train_images_per_second"] = images / seconds if seconds and images else None
        results["options"] = config.as_dict()
        results["processes"] = distributed.world_size()
        # One event folder for all the steps, the step as global step: TensorBoard draws each
        # score as a curve over the steps. The events go before the results file, which marks
        # the step as tested: a test killed in between is run again and replaces them.
        logger = self.files.event_logger("eval" if config.test else "test", file_suffix=f".step{self.step}")
        for key in ("miou_all", "miou_old", "miou_new", "miou_all_fg", "miou_old_fg", "miou_new_fg",
                    "overall_acc"):
            if scores[key] is not None:
                logger.scalar(f"test/{key}", scores[key], self.step)
        for key in ("miou_old_domains", "miou_new_domains"):
            if domain_groups.get(key) is not None:
                logger.scalar(f"test/{key}", domain_groups[key], self.step)
        _log_evaluation(logger, "test", scores, self._class_names(), samples, self.step)
        logger.close()
        self.files.write_results(results, self.results_path)
        if self.domain_incremental:
            LOGGER.info("step %d test (%s, %d images): mIoU all %s | old cities %s, this step's cities %s",
                        self.step, path, len(test_set), *(_percent(value) for value in (
                            scores["miou_all"], domain_groups["miou_old_domains"],
                            domain_groups["miou_new_domains"])))
        else:
            LOGGER.info(
                "step %d test (%s, %d images): mIoU all %s old %s new %s | without background: all %s "
                "old %s new %s", self.step, path, len(test_set), *(_percent(scores[key]) for key in (
                    "miou_all", "miou_old", "miou_new", "miou_all_fg", "miou_old_fg", "miou_new_fg")),
            )
        LOGGER.info("step %d results written to %s", self.step, self.results_path)
        return results


def _shared_images(val_set, test_set) -> str:
    """How the validation images relate to the test images, in words."""
    shared = len(set(val_set.image_paths) & set(test_set.image_paths))
    if shared == len(val_set) == len(test_set):
        return "the validation images are the test images"
    if shared == len(val_set):
        return "every validation image is also a test image"
    return f"{shared} of the validation images are also test images"


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _class_table(class_iou: List[Optional[float]], names: List[str]) -> str:
    return "\n".join(f"{name}: {_percent(iou)}" for name, iou in zip(names, class_iou))


def _log_evaluation(logger: Logger, prefix: str, scores: Dict[str, Any], class_names: List[str],
                    samples: List[torch.Tensor], step: int) -> None:
    """The per-class IoU (a table, and a scalar for each class that has one), the confusion matrix
    and the sample images of one evaluation, tagged ``<prefix>/...``."""
    logger.text(f"{prefix}/class_iou", _class_table(scores["class_iou"], class_names), step)
    for name, iou in zip(class_names, scores["class_iou"]):
        if iou is not None:
            logger.scalar(f"{prefix}/class_iou/{name}", iou, step)
    logger.confusion_matrix(f"{prefix}/confusion_matrix", scores["confusion_matrix"], class_names, step)
    for index, image in enumerate(samples):
        logger.image(f"{prefix}/sample_{index}", image, step)


def main(config: Config) -> None:
    """Run every step of ``config.steps`` in this process (one rank of a distributed job).

    Raises ``TrainingInterrupted`` when a stop signal ended training after an in-step checkpoint.
    """
    env = read_env()
    device = select_device(config.device, env.local_rank, config.dist_backend)
    backends = configure_backends(config.norm_kernels, config.tf32, device)
    distributed.init_distributed(env, device.type, config.collective_timeout, config.dist_backend)
    processes = distributed.placement(env.local_rank, device)
    stop_signal = StopSignal()
    stop_signal.install()
    files = RunFiles(config)
    failed = False
    try:
        checked = run_checks(config, files)
        if not config.test:
            # Outside the cleanup below: a refused lock means the folders belong to another launch.
            files.lock()
        files.open_run_log()
        LOGGER.info(
            "%s %s%s, steps %s, method %s, device %s, %d process(es)",
            config.dataset, config.task, " overlapped" if config.overlap else "", list(config.steps),
            config.method, device, distributed.world_size(),
        )
        LOGGER.info("processes: %s", processes)
        LOGGER.info("%s", backends)
        for note in [*config.notes, *files.notes, *checked.notes]:
            LOGGER.info("%s", note)
        for warning in checked.warnings:
            LOGGER.warning("%s", warning)
        try:
            for step in config.steps:
                StepRunner(config, step, device, files).run(stop_signal)
        except TrainingInterrupted as stopped:
            files.log_to_run_log(LOGGER, logging.WARNING, str(stopped))  # train.py prints it on the console
            raise  # its in-step checkpoint and logs are resumed by the next launch
        except Exception as error:
            files.log_to_run_log(LOGGER, logging.ERROR, f"{type(error).__name__}: {error}")
            failed = True
            raise
    finally:
        files.close(failed)
        stop_signal.uninstall()
        distributed.cleanup()
