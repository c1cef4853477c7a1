"""Training loop of one incremental step: one ``run_step()`` per iteration, resumable mid-epoch.

Exact resumption: a run killed at any iteration and restarted from its latest in-step
checkpoint ends with the same weights as an uninterrupted run. What makes this hold:
- the global batch order comes from ``GlobalBatchSampler`` (seeded by seed and epoch) and the
  position inside the epoch is stored (``batch_in_epoch``) and restored with ``set_start_batch``;
- augmentation is seeded per sample by the data layer from the epoch (``dataset.set_epoch``);
- DataLoader workers get seeds from a generator seeded by (seed, epoch), never from the global
  RNG, and ``seed_worker`` derives numpy/random seeds from it;
- model (incl. BN running statistics), optimizer (momentum buffers), LR scheduler, GradScaler and
  the torch/numpy/python/cuda RNG states of every rank are saved and restored.
Bit-identity holds where the kernels are deterministic (CPU). On CUDA some kernels (e.g. the
backward of bilinear upsampling) accumulate atomically, so two uninterrupted runs already differ
at float-rounding level and a resumed run is equivalent to the same degree.

Stop signals: SIGTERM/SIGUSR1 set a flag; after every iteration the ranks all-reduce it, so they
all stop after the same iteration, write an in-step checkpoint and raise ``TrainingInterrupted``.
"""
from __future__ import annotations

import argparse
import logging
import random
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from segmentation import distributed
from segmentation.engine.checkpoint import InStepCheckpoints
from segmentation.engine.evaluation import autocast_context
from segmentation.engine.logger import Logger, Progress
from segmentation.engine.methods import MethodLoss
from segmentation.engine.sampler import GlobalBatchSampler
from segmentation.methods.regularizer import Regularizer
from segmentation.signals import STOP_SIGNALS, restore_default_stop_handlers

LOGGER = logging.getLogger(__name__)

# Offset that separates DataLoader worker seeds from the sampler's seeds.
_WORKER_SEED_OFFSET = 7919


class TrainingInterrupted(Exception):
    """Raised after a stop signal once an in-step checkpoint was written on every rank's behalf."""

    def __init__(self, step: int, iteration: int) -> None:
        super().__init__(f"training of step {step} stopped by a signal after iteration {iteration}")
        self.step = step
        self.iteration = iteration


class StopSignal:
    """Records SIGTERM/SIGUSR1 (SLURM pre-emption, time limit) so the loop can stop cleanly."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def step_learning_rate(opts: argparse.Namespace, step: int) -> float:
    """Base LR of a step: ``--lr`` at step 0, ``--incremental_lr`` (if given) after it."""
    if step > 0 and opts.incremental_lr is not None:
        return opts.incremental_lr
    return opts.lr


def build_optimizer(model: nn.Module, opts: argparse.Namespace, step: int = 0) -> torch.optim.SGD:
    """SGD with Nesterov momentum and weight decay on every trained parameter (spec §5.3).

    Parameter groups: body (left out with ``--freeze``), head, classifiers; one LR for all.
    """
    groups: Dict[str, List[nn.Parameter]] = {"body": [], "head": [], "classifiers": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        top = name.split(".", 1)[0]
        if top == "body":
            if not opts.freeze:
                groups["body"].append(parameter)
        elif top == "cls":
            groups["classifiers"].append(parameter)
        else:
            groups["head"].append(parameter)
    param_groups = [
        {"params": params, "name": name} for name, params in groups.items() if params
    ]
    return torch.optim.SGD(
        param_groups,
        lr=step_learning_rate(opts, step),
        momentum=opts.momentum,
        nesterov=True,
        weight_decay=opts.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, opts: argparse.Namespace, total_iterations: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration LR schedule: poly ``(1 - k/K)^power`` or StepLR (spec §5.3)."""
    if opts.lr_policy == "poly":
        power = opts.lr_power

        def poly(iteration: int) -> float:
            return max(0.0, 1.0 - iteration / total_iterations) ** power

        return torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
    if opts.lr_policy == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=opts.lr_decay_step, gamma=opts.lr_decay_factor
        )
    raise ValueError(f"unknown --lr_policy {opts.lr_policy!r}; valid: poly, step")


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from its (deterministic) torch seed."""
    restore_default_stop_handlers()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state(device: torch.device) -> Dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device: torch.device) -> List[Dict[str, Any]]:
    """The RNG states of every rank, in rank order (on every rank)."""
    return distributed.all_gather_object(rng_state(device))


class Trainer:
    """Trains ``model`` for ``epochs`` epochs on ``train_set`` (batches from ``sampler``) with ``loss``.

    ``model`` may be DDP-wrapped; ``old_model`` (step t-1, frozen, eval mode) is used only when
    the loss needs it. ``checkpoints`` receives in-step checkpoints every ``ckpt_interval``
    iterations (0: epoch ends only) and at every epoch end; ``checkpoint_meta`` (dataset, task,
    step, classes, options) is stored with them. ``on_epoch_end(epoch)`` runs after each epoch
    (validation). Call ``resume(state)`` before ``train()`` to continue an interrupted step.
    ``regularizer`` (EWC, PI, RW) updates its importance from the loss gradients and adds its
    penalty's gradient after every backward; its state goes into the in-step checkpoints.
    ``dtype`` is the model's floating-point type (inputs are cast to it; float32 unless
    ``--dtype float64``).
    """

    def __init__(
        self,
        model: nn.Module,
        old_model: Optional[nn.Module],
        loss: MethodLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_set: Dataset,
        sampler: GlobalBatchSampler,
        *,
        device: torch.device,
        epochs: int,
        num_workers: int = 0,
        seed: int = 0,
        amp: str = "off",
        channels_last: bool = False,
        fix_bn: bool = False,
        checkpoints: Optional[InStepCheckpoints] = None,
        ckpt_interval: int = 0,
        checkpoint_meta: Optional[Dict[str, Any]] = None,
        logger: Optional[Logger] = None,
        print_interval: int = 10,
        on_epoch_end: Optional[Callable[[int], None]] = None,
        stop_signal: Optional[StopSignal] = None,
        regularizer: Optional[Regularizer] = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.old_model = old_model
        self.loss = loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_set = train_set
        self.device = device
        self.epochs = epochs
        self.num_workers = num_workers
        self.seed = seed
        self.amp = amp
        self.channels_last = channels_last
        self.fix_bn = fix_bn
        self.checkpoints = checkpoints
        self.ckpt_interval = ckpt_interval
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.logger = logger
        self.print_interval = max(1, print_interval)
        self.on_epoch_end = on_epoch_end
        self.stop_signal = stop_signal
        self.regularizer = regularizer
        self.dtype = dtype
        if loss.needs_old_model and old_model is None:
            raise ValueError("the loss needs the old model's outputs but no old model was given")

        self.sampler = sampler
        self.iterations_per_epoch = len(sampler)
        self.total_iterations = self.iterations_per_epoch * epochs
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

        self.epoch = 0
        self.batch_in_epoch = 0
        self.iteration = 0
        self.train_seconds = 0.0
        self.images_seen = 0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """In-step checkpoint content (collective: gathers every rank's RNG states)."""
        state = dict(self.checkpoint_meta)
        state.update(
            model_state=unwrap(self.model).state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            scaler_state=self.scaler.state_dict(),
            epoch=self.epoch,
            iteration=self.iteration,
            batch_in_epoch=self.batch_in_epoch,
            rng_states=gather_rng_states(self.device),
            train_seconds=self.train_seconds,
            images_seen=self.images_seen,
            regularizer_state=None if self.regularizer is None else self.regularizer.state_dict(),
        )
        return state

    def resume(self, state: Dict[str, Any]) -> None:
        """Restore an in-step checkpoint written by ``state_dict`` (on every rank)."""
        world_size = distributed.world_size()
        rng_states = state["rng_states"]
        if len(rng_states) != world_size:
            raise ValueError(
                f"the in-step checkpoint was written by {len(rng_states)} processes, this run has "
                f"{world_size}; resume with the same number of processes or pass --no_resume"
            )
        unwrap(self.model).load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.scaler.load_state_dict(state["scaler_state"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.iteration = int(state["iteration"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.images_seen = int(state.get("images_seen", 0))
        if self.regularizer is not None:
            if state.get("regularizer_state") is None:
                raise ValueError("the in-step checkpoint has no regularizer state (written by a run "
                                 "without --regularizer); pass --no_resume to start the step again")
            self.regularizer.load_state_dict(state["regularizer_state"])
        if self.batch_in_epoch >= self.iterations_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        set_rng_state(rng_states[distributed.rank()], self.device)

    def save_checkpoint(self) -> None:
        """Write an in-step checkpoint (collective; rank 0 writes)."""
        if self.checkpoints is None:
            return
        state = self.state_dict()
        if distributed.is_main_process():
            self.checkpoints.save(state, self.iteration)

    # ---------------------------------------------------------------- loop
    def train_mode(self) -> None:
        """``model.train()``, keeping norm layers in eval mode with ``--fix_bn`` (spec §8 B9)."""
        self.model.train()
        if self.fix_bn:
            unwrap(self.model).fix_bn()

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (collective, once per iteration)."""
        local = 1.0 if self.stop_signal is not None and self.stop_signal.received else 0.0
        if not distributed.is_initialized():
            return local > 0
        flag = torch.tensor([local], device=self.device)
        distributed.all_reduce_sum(flag)
        return bool(flag.item() > 0)

    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        if self.batch_in_epoch:
            self.sampler.set_start_batch(self.batch_in_epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        generator = torch.Generator()
        generator.manual_seed(self.seed * 100003 + epoch + _WORKER_SEED_OFFSET)
        return DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=seed_worker,
            generator=generator,
        )

    def _forward(
        self, model: nn.Module, images: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        """Logits, and body features when the loss needs them, computed under AMP, in float32."""
        features = None
        with autocast_context(self.device, self.amp):
            if self.loss.needs_features:
                logits, features = model(images, return_features=True)
            else:
                logits = model(images)
        if features is not None:
            features = {name: value.to(self.dtype) for name, value in features.items()}
        return logits.to(self.dtype), features

    def run_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns the detached loss components."""
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        old_logits = old_features = None
        if self.loss.needs_old_model:
            with torch.no_grad():
                old_logits, old_features = self._forward(self.old_model, images)

        self.optimizer.zero_grad(set_to_none=True)
        logits, features = self._forward(self.model, images)
        total, components = self.loss(logits, labels, old_logits, features, old_features)
        self.scaler.scale(total).backward()
        if self.regularizer is not None:
            self._regularize(components)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return components

    def _regularize(self, components: Dict[str, torch.Tensor]) -> None:
        """Importance update from the (unscaled) loss gradients, then the penalty's gradient.

        Under fp16 an overflowing iteration is skipped by the GradScaler; its gradients are not
        used for the importance either.
        """
        self.scaler.unscale_(self.optimizer)
        gradients_finite = self.amp != "fp16" or all(
            bool(torch.isfinite(p.grad).all())
            for p in self.regularizer.parameters.values() if p.grad is not None
        )
        if gradients_finite:
            self.regularizer.update()
        penalty = self.regularizer.apply_penalty()
        if penalty is not None:
            components["loss_reg"] = penalty.detach()
            components["loss"] = components["loss"] + penalty.detach()

    def train(self) -> None:
        """Train from the current position (0, or where ``resume`` left off) to the last epoch."""
        progress = Progress(
            self.total_iterations - self.iteration,
            desc=f"step {self.checkpoint_meta.get('step', '')}",
            enabled=distributed.is_main_process(),
            every=self.print_interval,
        )
        running: Dict[str, torch.Tensor] = {}
        running_count = 0
        while self.epoch < self.epochs:
            loader = self._loader(self.epoch)
            self.train_mode()
            epoch_sums: Dict[str, torch.Tensor] = {}
            epoch_count = 0
            start = time.perf_counter()
            for images, labels in loader:
                global_batch = images.shape[0] * distributed.world_size()
                components = self.run_step(images, labels)
                self.iteration += 1
                self.batch_in_epoch += 1
                self.images_seen += global_batch
                epoch_count += 1
                for name, value in components.items():
                    epoch_sums[name] = epoch_sums.get(name, 0.0) + value
                    running[name] = running.get(name, 0.0) + value
                running_count += 1
                postfix: Dict[str, float] = {}
                if self.iteration % self.print_interval == 0:
                    postfix = self._log_running(running, running_count)
                    running, running_count = {}, 0
                progress.update(global_batch, **postfix)
                stop = self._stop_requested()
                end_of_epoch = self.batch_in_epoch == self.iterations_per_epoch
                if stop or (
                    self.ckpt_interval > 0
                    and self.iteration % self.ckpt_interval == 0
                    and not end_of_epoch
                ):
                    self.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_checkpoint()
                if stop:
                    progress.close()
                    raise TrainingInterrupted(int(self.checkpoint_meta.get("step", -1)), self.iteration)
            self.train_seconds += time.perf_counter() - start
            self._log_epoch(epoch_sums, epoch_count)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self.epoch)
                self.train_mode()
            self.batch_in_epoch = self.iterations_per_epoch
            self.save_checkpoint()
            self.epoch += 1
            self.batch_in_epoch = 0
        progress.close()

    # ---------------------------------------------------------------- logging
    def _log_running(self, running: Dict[str, torch.Tensor], count: int) -> Dict[str, float]:
        """Log the mean loss components of the last ``count`` iterations and the LR."""
        means = {name: float(value) / count for name, value in running.items()}
        means["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.logger is not None:
            for name, value in means.items():
                self.logger.scalar(f"train/{name}", value, self.iteration)
        return means

    def _log_epoch(self, sums: Dict[str, torch.Tensor], count: int) -> None:
        if count == 0:
            return
        names = sorted(sums)
        values = torch.tensor([float(sums[name]) for name in names], device=self.device)
        distributed.all_reduce_sum(values)
        means = values / (count * distributed.world_size())
        summary = ", ".join(f"{name} {value:.4f}" for name, value in zip(names, means.tolist()))
        LOGGER.info("epoch %d/%d: %s", self.epoch + 1, self.epochs, summary)
        if self.logger is not None:
            for name, value in zip(names, means.tolist()):
                self.logger.scalar(f"epoch/{name}", value, self.epoch + 1)

