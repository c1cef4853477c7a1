"""Run a chain of incremental steps from parsed options: train, checkpoint, test, report.

For each step t of ``opts.steps``:
1. If the step-final checkpoint ``step<t>.pth`` exists and loads, the step is not trained again
   (only tested if its results file is missing). A corrupt one is set aside and the step is
   retrained from its latest in-step checkpoint when there is one; otherwise the run stops.
2. Otherwise the datasets and models are built; at t > 0 the step t-1 checkpoint is checked
   against the task and loaded (the new head is the only missing part), the old model is built
   from it when a distillation loss needs it. Training resumes from the latest in-step
   checkpoint when one exists (unless ``--no_resume``).
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

import argparse
import functools
import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from segmentation import distributed, tasks
from segmentation.data import CLASS_NAMES, build_dataset
from segmentation.data.dataset import held_out_split
from segmentation.data.palette import colorize
from segmentation.data.readers import label_family, list_name_for_split
from segmentation.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from segmentation.engine import checkpoint
from segmentation.engine.run_lock import RunLock, RunLockedError
from segmentation.faults import fault_point
from segmentation.signals import StopSignal
from segmentation.files import WriteError, atomic_write, remove_stale_temporaries
from segmentation.engine.evaluation import build_eval_loader, evaluate
from segmentation.engine.logger import Logger, RunLog
from segmentation.engine.options import ADE_BALANCED_SPLITS
from segmentation.engine.original_checkpoint import adapt_checkpoint
from segmentation.engine.preflight import UsageError, remove_created, run_checks
from segmentation.engine.sampler import GlobalBatchSampler
from segmentation.engine.loader_watch import DataLoaderFailure
from segmentation.launch_env import read_env
from segmentation.engine.optim import build_optimizer, build_scheduler
from segmentation.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted
from segmentation.methods.step_methods import StepMethods, StepStart, step_methods
from segmentation.models import build_model

LOGGER = logging.getLogger(__name__)

# In the run's log folder: what the console showed, appended by every launch of the run.
RUN_LOG_NAME = "train.log"

# Failures a long run meets (a corrupt checkpoint, a second launch, a full disk, a diverged loss,
# a hung or dead process): their messages say what happened and what to do, without a traceback.
RUN_FAILURES = (checkpoint.CheckpointError, RunLockedError, WriteError, NonFiniteLossError,
                distributed.CollectiveError, DataLoaderFailure)


def select_device(requested: str, local_rank: int) -> torch.device:
    """``--device``: "cpu", "cuda" (error if unavailable) or "auto" (cuda when available)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available; use --device cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def setting_dir(root: str, opts: argparse.Namespace) -> Path:
    """``<root>/<dataset>-<task>[-ov]/<name>`` (same layout for logs and checkpoints)."""
    return Path(checkpoint.run_dir(root, opts.dataset, opts.task, opts.overlap, opts.name))


def model_dtype(opts: argparse.Namespace) -> torch.dtype:
    """``--dtype`` as a torch dtype."""
    return getattr(torch, opts.dtype)


def make_model(opts: argparse.Namespace, classes: List[int], pretrained: Optional[str]) -> nn.Module:
    """The step model in ``--dtype`` (weights loaded later are cast to it)."""
    return build_model(
        classes,
        backbone=opts.backbone,
        output_stride=opts.output_stride,
        norm_act=opts.norm_act,
        pretrained=pretrained,
        pooling_size=opts.pooling,
    ).to(model_dtype(opts))


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


def write_json(data: Dict[str, Any], path: Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write(path, lambda handle: json.dump(data, handle, indent=2, default=str), "w")


def sample_image(image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Denormalised image | ground truth | prediction side by side, (3, H, 3W) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((image.detach().float().cpu() * std + mean).clamp(0, 1) * 255).to(torch.uint8)
    return torch.cat([rgb, colorize(label), colorize(prediction)], dim=2)


class StepRunner:
    """Runs one incremental step (train and/or test) for parsed options."""

    def __init__(self, opts: argparse.Namespace, step: int, device: torch.device) -> None:
        self.opts = opts
        self.step = step
        self.device = device
        self.classes = tasks.classes_per_step(opts.dataset, opts.task, step)
        self.num_channels = sum(self.classes)
        self.channel_order = tasks.channel_order(opts.dataset, opts.task, step)
        self.checkpoint_dir = setting_dir(opts.checkpoint_dir, opts)
        self.log_dir = setting_dir(opts.logdir, opts)
        self.final_path = Path(checkpoint.step_checkpoint_path(self.checkpoint_dir, step))
        self.results_path = self.log_dir / f"step{step}.json"
        self.main = distributed.is_main_process()

    # ---------------------------------------------------------------- entry
    def run(self, stop_signal: Optional[StopSignal] = None) -> None:
        opts = self.opts
        if opts.test:
            path = Path(opts.ckpt) if opts.ckpt else self.final_path
            if not path.is_file():
                raise FileNotFoundError(
                    f"--test: checkpoint {path} of step {self.step} does not exist; train the step "
                    "first or pass --ckpt <file>"
                )
            remedy = "pass another --ckpt" if opts.ckpt else "train the step again (delete the file first)"
            self.test(path, self.log_dir / f"eval-step{self.step}.json", report_training=False,
                      saved=self._load_step_checkpoint(path, self.step, remedy))
            return
        saved = self._finished_step_checkpoint()
        if saved is not None:
            if self.results_path.is_file():
                LOGGER.info("step %d already finished (%s exists): skipped", self.step, self.final_path)
                return
            LOGGER.info("step %d already trained (%s exists): testing it", self.step, self.final_path)
        else:
            self.train(stop_signal)
        self.test(self.final_path, self.results_path, report_training=True, saved=saved)

    def _load_step_checkpoint(self, path: Path, step: int, remedy: str) -> Dict[str, Any]:
        """The verified checkpoint of ``step`` at ``path``, one of the original code converted to
        this code's layout (the pre-training checks logged that); ``CheckpointError`` with
        ``remedy`` if it is unreadable or does not fit the task."""
        opts = self.opts
        saved, _ = adapt_checkpoint(
            checkpoint.load_checkpoint(path, remedy), opts.dataset, opts.task, step, opts.norm_act, path)
        classes = tasks.classes_per_step(opts.dataset, opts.task, step)
        checkpoint.check_step_checkpoint(saved, opts.dataset, opts.task, step, classes, path)
        return saved

    def _finished_step_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The verified ``step<t>.pth`` of a finished step, or None when the step must be trained.

        A corrupt file is renamed ``step<t>.pth.corrupt`` when the step's in-step checkpoints can
        train it again; without them the run stops with a ``CheckpointError``.
        """
        if not self.final_path.is_file():
            return None
        in_step = checkpoint.InStepCheckpoints(self.checkpoint_dir, self.step)
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
            if self.main:
                in_step.clear()  # left by a run killed just after writing step<t>.pth
            return saved
        if not (self.opts.resume and in_step.paths()):
            raise checkpoint.CheckpointError(error)
        LOGGER.warning("%s; step %d is trained again from its latest in-step checkpoint", error, self.step)
        if self.main:
            self.final_path.replace(self.final_path.with_name(self.final_path.name + ".corrupt"))
        distributed.barrier("the removal of the corrupt step checkpoint")
        return None

    # ---------------------------------------------------------------- models
    def _previous_checkpoint_path(self) -> Path:
        opts = self.opts
        if opts.step_ckpt and self.step == opts.steps[0]:
            return Path(opts.step_ckpt)
        return Path(checkpoint.step_checkpoint_path(self.checkpoint_dir, self.step - 1))

    def _previous_checkpoint_remedy(self) -> str:
        if self.opts.step_ckpt and self.step == self.opts.steps[0]:
            return "pass another --step_ckpt"
        return (f"delete it (or restore it from a backup) and rerun with --step {self.step - 1} "
                f"(or --step all) to train step {self.step - 1} again")

    def _build_models(self, methods: StepMethods):
        """The current model (step t-1 weights loaded at t > 0, then changed by the methods), the
        old model when a method needs it, and the step t-1 checkpoint (None at step 0)."""
        opts = self.opts
        model = make_model(opts, self.classes, opts.pretrained if self.step == 0 else None)
        old_model = previous = None
        if self.step > 0:
            path = self._previous_checkpoint_path()
            previous = self._load_step_checkpoint(path, self.step - 1, self._previous_checkpoint_remedy())
            load_new_step_model(model, previous["model_state"], self.step, path)
            methods.initialize_weights(model)
            if methods.needs_old_model:
                old_model = make_model(opts, self.classes[:-1], None)
                old_model.load_state_dict(previous["model_state"], strict=True)
                old_model = freeze(old_model).to(self.device)
                if opts.channels_last:
                    old_model = old_model.to(memory_format=torch.channels_last)
        model = model.to(self.device)
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if opts.fix_bn:
            model.fix_bn()
        return model, old_model, previous

    def _dataset(self, split: str, transform):
        opts = self.opts
        return build_dataset(
            opts.dataset,
            opts.data_root,
            opts.task,
            self.step,
            split,
            overlap=opts.overlap if split == "train" else True,
            transform=transform,
            seed=opts.random_seed,
            split_dir=opts.split_dir,
            mask_old=not opts.no_mask,
            images_from="train" if split == "test" and opts.val_on_trainset else None,
        )

    def _eval_loader(self, dataset):
        batch_size = 1 if self.opts.eval_full_image else self.opts.batch_size
        return build_eval_loader(dataset, batch_size, self.opts.num_workers, self.device)

    def _eval_transform(self):
        return eval_transform(self.opts.crop_size, full_image=self.opts.eval_full_image)

    @functools.cached_property
    def _test_set(self):
        """The test split of this step (built once: training describes it, the test uses it)."""
        return self._dataset("test", self._eval_transform())

    def _evaluation_sets(self, val_set, test_set) -> str:
        """One line: which images the validation and the test use, which classes they score, and
        how many images they share."""
        opts = self.opts
        step_classes = self.classes[-1] - (1 if self.step == 0 else 0)  # without the background
        background = " and the background" if label_family(opts.dataset) == "voc" else ""
        if opts.cross_val:
            labels = "old classes kept (--no_mask)" if opts.no_mask else "old classes as background"
            val = (f"{len(val_set)} training images held out by --cross_val (not trained on; labelled as "
                   f"for training: {labels})")
        else:
            scored = (f"scored on the {self.num_channels - 1} classes seen so far{background} (--no_mask)"
                      if opts.no_mask else
                      f"scored on these classes{background} (the other classes ignored)")
            val = (f"{len(val_set)} images of the {list_name_for_split(opts.dataset, 'val')!r} list that show "
                   f"one of this step's {step_classes} classes, {scored}")
        test_list = list_name_for_split(opts.dataset, "train" if opts.val_on_trainset else "test")
        test = (f"{len(test_set)} images of the {test_list!r} list that show one of the "
                f"{self.num_channels - 1} classes seen so far, scored on all of them{background}")
        shared = len(set(val_set.image_paths) & set(test_set.image_paths))
        if shared == len(val_set) == len(test_set):
            relation = "the validation images are the test images"
        elif shared == len(val_set):
            relation = "every validation image is also a test image"
        else:
            relation = f"{shared} of the validation images are also test images"
        return f"step {self.step}: validation on {val}; test on {test}; {relation}"

    def _evaluate(self, model: nn.Module, loader, fault: str,
                  num_old_channels: Optional[int] = None) -> Tuple[Dict[str, Any], List[torch.Tensor]]:
        """The scores of ``model`` on ``loader`` (``evaluate``) and, on rank 0, the sample images of
        its first ``--sample_num`` batches (their first image: image | ground truth | prediction)."""
        opts = self.opts
        samples: List[torch.Tensor] = []

        def on_batch(index: int, images, labels, predictions) -> None:
            fault_point(fault)
            if self.main and index < opts.sample_num:
                samples.append(sample_image(images[0], labels[0], predictions[0]))

        scores = evaluate(
            model, loader, self.num_channels, self.device, opts.amp, num_old_channels=num_old_channels,
            channels_last=opts.channels_last, on_batch=on_batch,
        )
        return scores, samples

    # ---------------------------------------------------------------- training
    def train(self, stop_signal: Optional[StopSignal]) -> None:
        opts = self.opts
        seed_everything(opts.random_seed)
        train_set = self._dataset("train", train_transform(opts.crop_size))
        if opts.dataset == "ade" and opts.task in ADE_BALANCED_SPLITS and opts.split_dir is None \
                and not opts.overlap:
            LOGGER.warning(
                "step %d: regenerated %s split of %d training images; the original's has %d "
                "(--allow_regenerated_splits: not the protocol)",
                self.step, opts.task, len(train_set), ADE_BALANCED_SPLITS[opts.task][self.step])
        if opts.cross_val:
            train_positions, val_positions = held_out_split(len(train_set), opts.random_seed)
            val_set = train_set.subset(val_positions, self._eval_transform())
            train_set = train_set.subset(train_positions, train_set.transform)
        else:
            val_set = self._dataset("val", self._eval_transform())
        LOGGER.info("%s", self._evaluation_sets(val_set, self._test_set))
        methods = step_methods(opts, self.step, num_old_channels=sum(self.classes[:-1]))
        model, old_model, previous = self._build_models(methods)
        methods.begin_step(StepStart(
            model=model, old_model=old_model, previous=previous,
            previous_path=str(self._previous_checkpoint_path()) if self.step > 0 else None,
            train_set=train_set, device=self.device,
        ))
        optimizer = build_optimizer(model, opts, self.step)
        world_size = distributed.world_size()
        sampler = GlobalBatchSampler(
            len(train_set), opts.batch_size, distributed.rank(), world_size, opts.random_seed,
            drop_last=True,
        )
        if len(sampler) == 0:
            raise ValueError(
                f"step {self.step}: the training set has {len(train_set)} images, fewer than one "
                f"global batch ({opts.batch_size} per process x {world_size} processes); lower "
                "--batch_size"
            )
        scheduler = build_scheduler(optimizer, opts, len(sampler) * opts.epochs)
        train_model: nn.Module = model
        if distributed.is_initialized() and world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=device_ids)

        logger = Logger(str(self.log_dir / f"step{self.step}"), enabled=self.main and opts.visualize)
        in_step = checkpoint.InStepCheckpoints(self.checkpoint_dir, self.step)
        if self.main and not opts.resume:
            in_step.clear()
        meta = {
            "dataset": opts.dataset,
            "task": opts.task,
            "overlap": opts.overlap,
            "step": self.step,
            "classes": self.classes,
            "channel_order": self.channel_order,
            "options": vars(opts),
        }
        val_loader = self._eval_loader(val_set)

        def validate(epoch: int) -> None:
            last = epoch + 1 == opts.epochs
            if (epoch + 1) % opts.val_interval != 0 and not last:
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
            epochs=opts.epochs,
            num_workers=opts.num_workers,
            seed=opts.random_seed,
            amp=opts.amp,
            channels_last=opts.channels_last,
            fix_bn=opts.fix_bn,
            checkpoints=in_step,
            ckpt_interval=opts.ckpt_interval,
            checkpoint_meta=meta,
            logger=logger,
            print_interval=opts.print_interval,
            on_epoch_end=validate,
            stop_signal=stop_signal,
            dtype=model_dtype(opts),
            max_bad_iterations=opts.max_bad_iterations,
            loader_timeout=opts.collective_timeout,
        )
        state = self._resume_state(in_step)
        if state is not None:
            trainer.resume(state)
            LOGGER.info("step %d: resumed from iteration %d (epoch %d of %d)",
                        self.step, state["iteration"], trainer.epoch + 1, opts.epochs)
        elif opts.resume:
            LOGGER.info("step %d: no in-step checkpoint in %s: training starts at iteration 0",
                        self.step, self.checkpoint_dir)
        LOGGER.info(
            "step %d: %d training images, %d iterations per epoch, %d epochs, global batch %d",
            self.step, len(train_set), len(sampler), opts.epochs, opts.batch_size * world_size,
        )
        trainer.train()

        if self.main:
            checkpoint.atomic_save(
                {
                    **meta,
                    "model_state": model.state_dict(),
                    "method": opts.method,
                    "method_states": methods.step_state(),
                    "train_seconds": trainer.train_seconds,
                    "train_images": trainer.images_seen,
                },
                self.final_path,
            )
            # Read it back before the in-step checkpoints that could rebuild it are deleted.
            self._load_step_checkpoint(self.final_path, self.step, "the disk may be failing")
            LOGGER.info("step %d: saved %s", self.step, self.final_path)
            fault_point("after-step-checkpoint")
        distributed.barrier(f"rank 0 writing {self.final_path}")
        if self.main:
            in_step.clear()
        logger.close()

    def _resume_state(self, in_step: checkpoint.InStepCheckpoints) -> Optional[Dict[str, Any]]:
        opts = self.opts
        if opts.ckpt:
            state = checkpoint.load_checkpoint(opts.ckpt, "pass another --ckpt")
            source = Path(opts.ckpt)
            if "optimizer_state" not in state:
                raise ValueError(
                    f"--ckpt {source}: not an in-step checkpoint (no optimizer state); to test a "
                    "step-final checkpoint use --test --ckpt"
                )
        elif opts.resume:
            state = in_step.latest()
            source = self.checkpoint_dir / f"step{self.step}-iter*.pth"
            # Every rank reads the files itself; they must have picked the same one.
            picked = distributed.all_gather_object(
                None if state is None else state["iteration"], what="the choice of the in-step checkpoint"
            )
            if len(set(picked)) > 1:
                raise RuntimeError(
                    f"the processes found different in-step checkpoints in {self.checkpoint_dir} "
                    f"(iterations {picked}); is the folder shared by all nodes?"
                )
        else:
            return None
        if state is None:
            return None
        checkpoint.check_step_checkpoint(
            state, opts.dataset, opts.task, self.step, self.classes, source
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
        names = CLASS_NAMES[self.opts.dataset]
        return [names[label] for label in self.channel_order]

    def test(self, path: Path, results_path: Path, report_training: bool,
             saved: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Evaluate the checkpoint at ``path`` (already loaded: ``saved``) on the test split and
        write ``results_path``.

        ``report_training``: include the training time and speed stored in the checkpoint.
        """
        opts = self.opts
        if saved is None:
            saved = self._load_step_checkpoint(path, self.step, "train the step again (delete the file first)")
        model = make_model(opts, self.classes, None)
        model.load_state_dict(saved["model_state"], strict=True)
        model = model.to(self.device)
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        test_set = self._test_set
        with distributed.waiting_for(f"the test of step {self.step}"):
            scores, samples = self._evaluate(model, self._eval_loader(test_set), "test",
                                             num_old_channels=self.classes[0])
        results = {
            "dataset": opts.dataset,
            "task": opts.task,
            "overlap": opts.overlap,
            "step": self.step,
            "num_steps": tasks.num_steps(opts.dataset, opts.task),
            "method": opts.method,
            "name": opts.name,
            "checkpoint": str(path),
            "channel_order": self.channel_order,
            "class_names": self._class_names(),
            "class_iou": scores["class_iou"],
        }
        for key in ("miou_all", "miou_old", "miou_new", "miou_all_fg", "miou_old_fg", "miou_new_fg",
                    "hmean", "hmean_fg", "overall_acc", "mean_acc"):
            results[key] = scores[key]
        seconds = saved.get("train_seconds") if report_training else None
        images = saved.get("train_images") if report_training else None
        results["train_seconds"] = seconds
        results["train_images_per_second"] = images / seconds if seconds and images else None
        results["options"] = vars(opts)
        if self.main:
            # One event folder for all the steps, the step as global step: TensorBoard draws each
            # score as a curve over the steps. The events go before the results file, which marks
            # the step as tested: a test killed in between is run again and replaces them.
            logger = Logger(str(self.log_dir / ("eval" if opts.test else "test")), enabled=opts.visualize,
                            file_suffix=f".step{self.step}")
            for key in ("miou_all", "miou_old", "miou_new", "miou_all_fg", "miou_old_fg", "miou_new_fg",
                        "overall_acc"):
                if scores[key] is not None:
                    logger.scalar(f"test/{key}", scores[key], self.step)
            _log_evaluation(logger, "test", scores, self._class_names(), samples, self.step)
            logger.close()
            write_json(results, results_path)
            LOGGER.info(
                "step %d test (%s, %d images): mIoU all %s old %s new %s | without background: all %s "
                "old %s new %s", self.step, path, len(test_set), *(_percent(scores[key]) for key in (
                    "miou_all", "miou_old", "miou_new", "miou_all_fg", "miou_old_fg", "miou_new_fg")),
            )
            LOGGER.info("step %d results written to %s", self.step, results_path)
        distributed.barrier(f"rank 0 writing {results_path}")
        return results


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


def lock_run(folder: Path, log_folder: Path) -> Optional[RunLock]:
    """Rank 0 takes the lock of the run's checkpoint folder (every rank raises ``RunLockedError``
    if it is held) and removes the temporary files of writes that a killed run left there and in
    its log folder. Returns rank 0's lock, None on the other ranks."""
    lock = RunLock(folder) if distributed.is_main_process() else None
    failure: Optional[str] = None
    if lock is not None:
        try:
            lock.acquire()
            for stale in [*remove_stale_temporaries(folder), *remove_stale_temporaries(log_folder)]:
                LOGGER.info("removed %s, left by a write that was interrupted", stale)
        except RunLockedError as error:
            failure = str(error)
    failure = distributed.broadcast_object(failure, what=f"rank 0 locking {folder}")
    if failure is not None:
        raise RunLockedError(failure)
    return lock


def main(opts: argparse.Namespace) -> None:
    """Run every step of ``opts.steps`` in this process (one rank of a distributed job).

    Raises ``TrainingInterrupted`` when a stop signal ended training after an in-step checkpoint.
    """
    env = read_env()
    device = select_device(opts.device, env.local_rank)
    distributed.init_distributed(env, device.type, opts.collective_timeout)
    stop_signal = StopSignal()
    stop_signal.install()
    lock = run_log = None
    try:
        preflight = run_checks(opts, setting_dir(opts.checkpoint_dir, opts), setting_dir(opts.logdir, opts))
        if not opts.test:
            # Outside the cleanup below: a refused lock means the folders belong to another launch.
            lock = lock_run(setting_dir(opts.checkpoint_dir, opts), setting_dir(opts.logdir, opts))
            preflight.remove_overwritten()
        if distributed.is_main_process():
            run_log = RunLog(setting_dir(opts.logdir, opts) / RUN_LOG_NAME)
        LOGGER.info(
            "%s %s%s, steps %s, method %s, device %s, %d process(es)",
            opts.dataset, opts.task, " overlapped" if opts.overlap else "", opts.steps,
            opts.method, device, distributed.world_size(),
        )
        for note in [*getattr(opts, "notes", []), *preflight.notes]:
            LOGGER.info("%s", note)
        for warning in preflight.warnings:
            LOGGER.warning("%s", warning)
        try:
            for step in opts.steps:
                StepRunner(opts, step, device).run(stop_signal)
        except TrainingInterrupted as stopped:
            if run_log is not None:  # train.py prints it on the console
                run_log.write(LOGGER, logging.WARNING, str(stopped))
            raise  # its in-step checkpoint and logs are resumed by the next launch
        except Exception as error:
            if run_log is not None:
                run_log.write(LOGGER, logging.ERROR, f"{type(error).__name__}: {error}")
                run_log.close()  # before its folder may be removed
            if distributed.is_main_process():
                remove_created(preflight.created)
            raise
    finally:
        if run_log is not None:
            run_log.close()
        if lock is not None:
            lock.release()
        stop_signal.uninstall()
        distributed.cleanup()
