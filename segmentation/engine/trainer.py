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

Host checks: the loop does not wait for the device after each iteration. Every
``check_interval`` iterations (at most ``MAX_CHECK_INTERVAL``, and before every checkpoint) the
ranks combine in one all-reduce the stop flag and the non-finite state that accumulated on the
device since the last check:
- SIGTERM/SIGUSR1 set a flag; all ranks see it at the same check, stop after the same
  iteration, write an in-step checkpoint and raise ``TrainingInterrupted``;
- a NaN/Inf loss term (or gradient, without fp16's GradScaler, which skips those steps itself)
  is recorded on the device with the first iteration where it happened; the check raises
  ``NonFiniteLossError`` naming it, and no checkpoint is written after it. With
  ``max_bad_iterations`` > 0 every iteration is checked instead and a bad one is skipped (no
  update) with a warning, up to that many times.
"""
from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from segmentation import distributed
from segmentation.engine.checkpoint import InStepCheckpoints
from segmentation.engine.evaluation import autocast_context
from segmentation.engine.loader_watch import DataLoaderFailure, SampleTracker
from segmentation.engine.logger import Logger, Progress
from segmentation.engine.sampler import GlobalBatchSampler
from segmentation.errors import EXIT_INTERRUPTED, RunError
from segmentation.faults import fault_point
from segmentation.methods.step_methods import StepMethods, StepOutputs
from segmentation.signals import StopSignal, detach_worker_from_stop_signals

if TYPE_CHECKING:
    from segmentation.engine.run_files import InStepWriter

LOGGER = logging.getLogger(__name__)

# Offset that separates DataLoader worker seeds from the sampler's seeds.
_WORKER_SEED_OFFSET = 7919
# Longest run of iterations without a host check (stop flag, NaN/Inf state).
MAX_CHECK_INTERVAL = 10
_NO_BAD_ITERATION = -1


class TrainingInterrupted(RunError):
    """Raised after a stop signal once an in-step checkpoint (or, during the pass over the training
    set before training, its counts) was written on every rank's behalf."""

    exit_code = EXIT_INTERRUPTED
    raised_on_every_rank = True  # every process stopped after the same iteration

    def __init__(self, step: int, iteration: int, data_pass_batch: Optional[int] = None) -> None:
        if data_pass_batch is None:
            what = (f"training of step {step} stopped by a signal after iteration {iteration}; an in-step "
                    "checkpoint was written")
        else:
            what = (f"the pass over the training set before the training of step {step} stopped by a signal "
                    f"after batch {data_pass_batch}; its counts were saved")
        super().__init__(f"{what}, rerun the same command to resume")
        self.step = step
        self.iteration = iteration


class NonFiniteLossError(RunError, RuntimeError):
    """A loss term or the gradient became NaN/Inf (more often than ``max_bad_iterations`` allows)."""

    raised_on_every_rank = True  # the ranks agree on it in one all-reduce

    def __init__(self, step: int, iteration: int, terms: List[str], last_checkpoint: Optional[int]) -> None:
        kept = (f"the last in-step checkpoint (iteration {last_checkpoint}) is kept"
                if last_checkpoint is not None else "no in-step checkpoint was written yet")
        super().__init__(
            f"step {step}: non-finite value (NaN or Inf) in {', '.join(terms)} at iteration {iteration}; "
            f"training stopped and {kept}. Lower --lr, train in float32 or bf16 (--amp), or pass "
            "--max_bad_iterations N to skip such iterations, then rerun the same command to resume"
        )
        self.step = step
        self.iteration = iteration
        self.terms = terms


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from its (deterministic) torch seed; the
    worker ignores the stop signals and dies with the trainer."""
    detach_worker_from_stop_signals()
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
    """Trains ``model`` for ``epochs`` epochs on ``train_set`` (batches from ``sampler``) with the
    loss and hooks of the step's active ``methods``.

    ``model`` may be DDP-wrapped; ``old_model`` (step t-1, frozen, eval mode) is used only when
    a method needs it. ``checkpoints.save(state, iteration)`` is called on every rank (the run's
    files write on rank 0) every ``ckpt_interval`` iterations (0: epoch ends only) and at every
    epoch end; ``checkpoint_meta`` (dataset, task,
    step, classes, options) is stored with them. ``on_epoch_end(epoch)`` runs after each epoch
    (validation). Call ``resume(state)`` before ``train()`` to continue an interrupted step.
    After every backward the methods observe the loss gradients, then add their own gradient
    terms; their state goes into the in-step checkpoints.
    ``dtype`` is the model's floating-point type (inputs are cast to it; float32 unless
    ``--dtype float64``).
    """

    def __init__(
        self,
        model: nn.Module,
        old_model: Optional[nn.Module],
        methods: StepMethods,
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
        checkpoints: Optional[Union[InStepCheckpoints, InStepWriter]] = None,
        ckpt_interval: int = 0,
        checkpoint_meta: Optional[Dict[str, Any]] = None,
        logger: Optional[Logger] = None,
        print_interval: int = 10,
        on_epoch_end: Optional[Callable[[int], None]] = None,
        stop_signal: Optional[StopSignal] = None,
        dtype: torch.dtype = torch.float32,
        max_bad_iterations: int = 0,
        loader_timeout: float = 0.0,
    ) -> None:
        self.model = model
        self.old_model = old_model
        self.methods = methods
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
        self.dtype = dtype
        self.max_bad_iterations = max_bad_iterations
        self.loader_timeout = loader_timeout
        self.check_interval = min(self.print_interval, MAX_CHECK_INTERVAL)
        if methods.needs_old_model and old_model is None:
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
        self.bad_iterations = 0
        self.last_checkpoint: Optional[int] = None
        self._tracker: Optional[SampleTracker] = None
        self._batches: Optional[Any] = None  # the running epoch's loader iterator
        # Device-side record of the first non-finite iteration since the last host check and
        # which values were non-finite then (the loss terms, then the gradient).
        self._term_names: List[str] = []
        self._first_bad = torch.full((), _NO_BAD_ITERATION, dtype=torch.int64, device=device)
        self._bad_terms: Optional[torch.Tensor] = None

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
            method_states=self.methods.state_dict(),
            bad_iterations=self.bad_iterations,
        )
        return state

    def resume(self, state: Dict[str, Any]) -> int:
        """Restore an in-step checkpoint written by ``state_dict`` (on every rank); returns the
        number of processes that wrote it.

        Nothing in it depends on the number of processes but the RNG states, one per process: the
        position is counted in global batches, the weights, optimizer, scaler and method states are
        the same on every process. Every process seeds its generators alike and training draws from
        them nothing that depends on the rank, so on another number of processes each takes rank 0's.
        """
        rng_states = state["rng_states"]
        same_processes = len(rng_states) == distributed.world_size()
        unwrap(self.model).load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.scaler.load_state_dict(state["scaler_state"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.iteration = int(state["iteration"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.images_seen = int(state.get("images_seen", 0))
        self.methods.load_state_dict(state.get("method_states", {}))
        self.bad_iterations = int(state.get("bad_iterations", 0))
        self.last_checkpoint = self.iteration
        if self.batch_in_epoch >= self.iterations_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        set_rng_state(rng_states[distributed.rank() if same_processes else 0], self.device)
        return len(rng_states)

    def save_checkpoint(self) -> None:
        """Write an in-step checkpoint (collective; rank 0 writes). Call after a host check."""
        if self.checkpoints is None:
            return
        if not all(torch.isfinite(value).all() for value in unwrap(self.model).state_dict().values()
                   if value.is_floating_point()):
            raise NonFiniteLossError(self._step(), self.iteration, ["the model weights"], self.last_checkpoint)
        self.checkpoints.save(self.state_dict(), self.iteration)
        self.last_checkpoint = self.iteration

    # ---------------------------------------------------------------- loop
    def train_mode(self) -> None:
        """``model.train()``, keeping norm layers in eval mode with ``--fix_bn`` (the original's
        model.train() put them back into training mode)."""
        self.model.train()
        if self.fix_bn:
            unwrap(self.model).fix_bn()

    def _step(self) -> int:
        return int(self.checkpoint_meta.get("step", -1))

    def _stop_received(self) -> bool:
        return self.stop_signal is not None and self.stop_signal.received is not None

    def _check(self) -> bool:
        """Host check (collective): raise ``NonFiniteLossError`` if a non-finite value was recorded
        on any rank since the last check; return whether any rank received a stop signal."""
        stop = 1 if self._stop_received() else 0
        flags = torch.stack([torch.tensor(stop, device=self.device), self._first_bad])
        if distributed.is_initialized():
            # Max over ranks of (stop, -first bad iteration); no bad iteration counts as -inf.
            encoded = torch.where(flags[1] == _NO_BAD_ITERATION, torch.iinfo(torch.int64).min, -flags[1])
            flags = torch.stack([flags[0], encoded])
            distributed.all_reduce_max(flags, what=f"the check after iteration {self.iteration}")
            stop_any, encoded = flags.tolist()
            first_bad = _NO_BAD_ITERATION if encoded == torch.iinfo(torch.int64).min else -encoded
        else:
            stop_any, first_bad = flags.tolist()
        if first_bad != _NO_BAD_ITERATION:
            raise NonFiniteLossError(self._step(), first_bad, self._bad_term_names(first_bad),
                                     self.last_checkpoint)
        return stop_any > 0

    def _bad_term_names(self, iteration: int) -> List[str]:
        """The values that were non-finite at ``iteration`` on the ranks where it happened."""
        local = []
        if self._bad_terms is not None and int(self._first_bad) == iteration:
            names = [*self._term_names, "the gradient"]
            local = [name for name, bad in zip(names, self._bad_terms.tolist()) if bad]
        gathered = distributed.all_gather_object(local, what="the report of a non-finite loss")
        terms = [name for names in gathered for name in names]
        return sorted(set(terms), key=terms.index) or ["the loss"]

    def _record_health(self, total: torch.Tensor, components: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Record on the device whether this iteration's loss terms or gradient are non-finite;
        returns that flag (a device tensor, no synchronisation)."""
        self._term_names = [name for name in components if name != "loss"] or ["loss"]
        values = [components[name] if name in components else total for name in self._term_names]
        finite = torch.isfinite(torch.stack([value.detach().float() for value in values]))
        if not self.scaler.is_enabled():  # fp16's GradScaler skips non-finite gradients itself
            gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros((), device=self.device)
            # A non-finite loss makes the gradient non-finite too: only a finite loss blames it.
            gradient_finite = torch.isfinite(norm) | ~finite.all()
            finite = torch.cat([finite, gradient_finite.reshape(1)])
        else:
            finite = torch.cat([finite, torch.ones(1, dtype=torch.bool, device=self.device)])
        bad = ~finite.all()
        first = bad & (self._first_bad == _NO_BAD_ITERATION)
        self._first_bad = torch.where(first, self.iteration + 1, self._first_bad)
        self._bad_terms = ~finite if self._bad_terms is None else torch.where(first, ~finite, self._bad_terms)
        return bad

    def _skip_bad_iteration(self, bad: torch.Tensor) -> bool:
        """With ``max_bad_iterations``: whether this iteration is non-finite on any rank (then it
        is counted, reported and must be skipped); raises once the allowance is used up."""
        flag = bad.to(torch.int64).reshape(1)
        distributed.all_reduce_max(flag, what=f"the non-finite check of iteration {self.iteration + 1}")
        if not flag.item():
            return False
        iteration = self.iteration + 1
        terms = self._bad_term_names(iteration)
        self.bad_iterations += 1
        if self.bad_iterations > self.max_bad_iterations:
            raise NonFiniteLossError(self._step(), iteration, terms, self.last_checkpoint)
        LOGGER.warning(
            "step %d: non-finite value in %s at iteration %d: iteration skipped (%d of at most %d)",
            self._step(), ", ".join(terms), iteration, self.bad_iterations, self.max_bad_iterations,
        )
        self._first_bad.fill_(_NO_BAD_ITERATION)
        return True

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        if start_batch:
            self.sampler.set_start_batch(start_batch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        generator = torch.Generator()
        generator.manual_seed(self.seed * 100003 + epoch + _WORKER_SEED_OFFSET)
        self._tracker = SampleTracker(self.train_set, self.num_workers)
        return DataLoader(
            self._tracker,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=seed_worker,
            generator=generator,
            timeout=self.loader_timeout if self.num_workers > 0 else 0,
        )

    def _forward(
        self, model: nn.Module, images: torch.Tensor, features: FrozenSet[str] = frozenset()
    ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        """Logits, and the requested ``features`` (None when none), computed under AMP, in the model's dtype."""
        maps = None
        with autocast_context(self.device, self.amp):
            if features:
                logits, maps = model(images, features=features)
            else:
                logits = model(images)
        if maps is not None:
            maps = {name: value.to(self.dtype) for name, value in maps.items()}
        return logits.to(self.dtype), maps

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def run_data_passes(self, saved: Optional[Dict[str, Any]] = None) -> None:
        """Run the methods' passes over the training set before training (``DataPass``): the batches
        of epoch 0 through the old model, without gradients; each pass's counts are summed over the
        processes and handed to it. ``saved``: the counts a stopped pass saved (``step<t>-pass.pth``),
        to continue from. A stop signal saves the counts and raises ``TrainingInterrupted``.
        The complete pass is saved too, so that a run stopped before its first in-step checkpoint
        does not run it again.
        """
        passes = self.methods.data_passes()
        if not passes:
            return
        if self.old_model is None:
            raise ValueError("a pass over the training set needs the old model, but none was given")
        step = self._step()
        total = self.iterations_per_epoch
        counts = [data_pass.new_counts(self.device) for data_pass in passes]
        done = start = 0
        if saved is not None:
            done = start = int(saved["batches"])
            if distributed.rank() == 0:  # the saved counts are already the sum over the processes
                for count, saved_count in zip(counts, saved["counts"]):
                    count.copy_(saved_count)
            LOGGER.info("step %d: %s continues at batch %d of %d", step, passes[0].name, done, total)
        else:
            LOGGER.info("step %d: %s over the %d training batches of epoch 0", step,
                        ", ".join(data_pass.name for data_pass in passes), total)
        progress = Progress(total - done, desc=f"step {step} pass", enabled=distributed.is_main_process(),
                            every=self.print_interval)
        if done < total:
            for images, labels in self._epoch_batches(self._loader(0, done)):
                global_batch = images.shape[0] * distributed.world_size()
                with distributed.waiting_for(f"batch {done + 1} of the pass before step {step}"):
                    images, labels = self._to_device(images, labels)
                    with torch.no_grad():
                        old_logits, _ = self._forward(self.old_model, images)
                        for data_pass, count in zip(passes, counts):
                            data_pass.add_batch(count, labels, old_logits)
                done += 1
                fault_point(f"data-pass-batch:{done}")
                progress.update(global_batch)
                stop_seen_alone = distributed.world_size() == 1 and self._stop_received()
                if (done % self.check_interval == 0 or stop_seen_alone) and done < total and self._check():
                    self._sum_over_processes(counts)
                    self._save_data_pass(counts, done)
                    progress.close()
                    raise TrainingInterrupted(step, 0, data_pass_batch=done)
        progress.close()
        self._sum_over_processes(counts)
        if done > start:  # a pass loaded complete is on disk already
            self._save_data_pass(counts, done)
        for data_pass, count in zip(passes, counts):
            data_pass.finish(count)

    @staticmethod
    def _sum_over_processes(counts: List[torch.Tensor]) -> None:
        for count in counts:
            distributed.all_reduce_sum(count, what="the counts of the pass over the training set")

    def _save_data_pass(self, counts: List[torch.Tensor], batches: int) -> None:
        """Rank 0 saves ``counts`` (already summed over the processes) after ``batches`` batches."""
        if self.checkpoints is not None:
            self.checkpoints.save_data_pass({"batches": batches, "counts": [count.cpu() for count in counts]})

    def run_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns the detached loss components."""
        images, labels = self._to_device(images, labels)
        outputs = StepOutputs(labels=labels, logits=None)
        if self.methods.needs_old_model:
            with torch.no_grad():
                outputs.old_logits, outputs.old_features = self._forward(
                    self.old_model, images, self.methods.feature_names)

        self.optimizer.zero_grad(set_to_none=True)
        outputs.logits, outputs.features = self._forward(self.model, images, self.methods.feature_names)
        total, components = self.methods.loss(outputs)
        self.scaler.scale(total).backward()
        bad = self._record_health(total, components)
        if self.max_bad_iterations > 0 and self._skip_bad_iteration(bad):
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.methods.uses_gradients:
                self._gradient_hooks(components)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        return components

    def _gradient_hooks(self, components: Dict[str, torch.Tensor]) -> None:
        """The methods observe the (unscaled) loss gradients, then add their own gradient terms.

        Under fp16 an overflowing iteration is skipped by the GradScaler; the methods do not
        observe its gradients either (found with one fused norm and one host synchronisation).
        """
        self.scaler.unscale_(self.optimizer)
        if self.amp == "fp16":
            gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
            gradients_finite = not gradients or bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients)))
        else:
            gradients_finite = True
        if gradients_finite:
            self.methods.observe_gradients()
        self.methods.add_gradients(components)

    def train(self) -> None:
        """Train from the current position (0, or where ``resume`` left off) to the last epoch.

        A data-loader worker that dies or stalls raises ``DataLoaderFailure`` naming the samples
        being read.
        """
        try:
            self._train()
            return
        except DataLoaderFailure as failure:  # from fetching a batch
            failed: RuntimeError = failure
        except RuntimeError as error:  # from the loader's SIGCHLD handler, anywhere in the loop
            if "DataLoader worker" not in str(error) or self._tracker is None:
                raise
            failed = error
        # Until the failed iterator's workers are stopped, the loader's SIGCHLD handler raises the
        # same error again at the next child process exit, wherever this code is: start over then.
        # Stopping them removes that check, so the second pass gets through.
        while True:
            try:
                if isinstance(failed, DataLoaderFailure):
                    message = str(failed)
                else:
                    message = self._tracker.describe_failure(failed)
                shutdown = getattr(self._batches, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                break
            except RuntimeError as error:
                if "DataLoader worker" not in str(error):
                    raise
        if self._tracker is not None:
            self._tracker.kill_workers()
        self._batches = None
        raise DataLoaderFailure(message)

    def _epoch_batches(self, loader: DataLoader) -> Iterator[Any]:
        """The loader's batches; a failure to fetch one raises ``DataLoaderFailure``."""
        self._batches = iter(loader)
        while True:
            try:
                batch = next(self._batches)
            except StopIteration:
                return
            except (RuntimeError, OSError) as error:  # a dead, stalled or failing worker
                message = loader.dataset.describe_failure(error)
            else:
                yield batch
                continue
            raise DataLoaderFailure(message)

    def _train(self) -> None:
        progress = Progress(
            self.total_iterations - self.iteration,
            desc=f"step {self.checkpoint_meta.get('step', '')}",
            enabled=distributed.is_main_process(),
            every=self.print_interval,
        )
        running: Dict[str, torch.Tensor] = {}
        running_count = 0
        while self.epoch < self.epochs:
            loader = self._loader(self.epoch, self.batch_in_epoch)
            self.train_mode()
            epoch_sums: Dict[str, torch.Tensor] = {}
            epoch_count = 0
            start = time.perf_counter()
            for images, labels in self._epoch_batches(loader):
                global_batch = images.shape[0] * distributed.world_size()
                with distributed.waiting_for(f"iteration {self.iteration + 1} of step {self._step()}"):
                    components = self.run_step(images, labels)
                self.iteration += 1
                fault_point(f"train-iteration:{self.iteration}")
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
                end_of_epoch = self.batch_in_epoch == self.iterations_per_epoch
                checkpoint_due = (self.ckpt_interval > 0 and self.iteration % self.ckpt_interval == 0
                                  and not end_of_epoch)
                # One process reads its own stop flag for free: it stops at the next iteration.
                stop_seen_alone = distributed.world_size() == 1 and self._stop_received()
                if not (checkpoint_due or end_of_epoch or stop_seen_alone
                        or self.iteration % self.check_interval == 0):
                    continue
                stop = self._check()
                if stop or checkpoint_due:
                    self.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_checkpoint()
                if stop:
                    progress.close()
                    raise TrainingInterrupted(self._step(), self.iteration)
            self.train_seconds += time.perf_counter() - start
            self._log_epoch(epoch_sums, epoch_count)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self.epoch)
                self.train_mode()
            self.batch_in_epoch = self.iterations_per_epoch
            self.save_checkpoint()
            self.epoch += 1
            self.batch_in_epoch = 0
            if self._check():  # a stop signal during validation: the epoch's checkpoint is written
                progress.close()
                raise TrainingInterrupted(self._step(), self.iteration)
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

