"""What a method is: the interface between one incremental-learning method and the engine.

A method is one class in one module of ``segmentation/methods/`` plus a line in the registry
(``segmentation/methods/__init__.py``). The class says, without torch:

- ``add_options(group)``: the command-line options it owns (the run's ``Config`` holds their
  values in ``config.methods``, e.g. ``config.methods.loss_kd``); ``check_options(config)``: whether
  their values can work (an error message, or None); ``non_negative_options``: its options that
  must be >= 0 (checked with the engine's own);
- ``preset`` and ``task_preset(task)``: the options ``--method`` fills in (explicit flags win);
  ``domain_preset(task)`` those it fills in on a domain-incremental task;
- ``active(config)``: whether it takes part in a run with these options. Methods combine: the
  options of the original command line (``--unce --unkd --loss_kd 10 --init_balanced``) switch
  on the methods that own them, with or without ``--method``;
- ``incremental_options``: its options that act only from step 1 on, so that one step-0 model
  can start it and any other method whose step 0 is the same; ``neutral_options``: its options
  that change no number (the same-name check ignores them).

For each step the engine builds one instance of every active method (``__init__(config, step)``)
and calls its hooks, in this order:

1. ``initialize_weights(model)``: the step's model with the step t-1 weights loaded, before it
   moves to the device (e.g. MiB's classifier initialisation);
2. ``begin_step(start)``: the model on its device, the old model, the step t-1 checkpoint and the
   training set (e.g. state carried from the previous step);
   then ``data_pass()``: a ``DataPass`` that the engine runs once over the step's training set
   before training (the old model's outputs of every batch, e.g. PLOP's thresholds), with
   progress, stop signals and resume handled like training's; skipped when training resumes
   from an in-step checkpoint (the method's state then holds what the pass computed);
3. for every iteration: ``classification()`` (once: the classification loss, if this method
   replaces cross-entropy), ``loss_terms(outputs)``: weighted loss terms from the batch's labels
   and the new and old models' outputs; after the backward ``observe_gradients()`` (every
   method reads the loss gradients before any adds to them) and then ``add_gradients()``:
   terms whose gradient the method adds itself (e.g. a weight penalty in closed form);
4. ``state_dict``/``load_state_dict``: its in-step state (exact resume), and ``step_state()``:
   what the step checkpoint carries to the next step (under ``state_name``).

``needs_old_model`` and ``feature_names`` (model features the loss reads, e.g. ``{"body"}``)
tell the engine what to compute. Modules import torch inside the per-step code only, so that
parsing the command line (which reads the registry) stays fast.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Mapping, Optional
from segmentation.config import Config

if TYPE_CHECKING:
    import torch
    import torch.nn as nn
    from torch.utils.data import Dataset

Preset = Dict[str, object]


@dataclass(frozen=True)
class StepInfo:
    """The step a method instance serves: ``num_old_channels`` is C_{t-1} (0 at step 0),
    ``num_channels`` is C_t (every channel of the step's model, background included)."""

    step: int
    num_old_channels: int
    num_channels: int
    #: A domain-incremental task: the same channels at every step, all of them old from step 1 on.
    domain_incremental: bool = False

    @property
    def num_new_channels(self) -> int:
        """The channels this step adds; on a domain-incremental task all of them, as the original
        counted them (so Local POD's schedule sqrt(C_t / N) is 1 there)."""
        return self.num_channels if self.domain_incremental else self.num_channels - self.num_old_channels


@dataclass
class StepStart:
    """What ``Method.begin_step`` may use. ``previous`` is the step t-1 checkpoint (None at step 0),
    read from ``previous_path``; ``old_model`` exists when an active method needs it."""

    model: "nn.Module"
    old_model: Optional["nn.Module"]
    previous: Optional[Mapping[str, Any]]
    previous_path: Optional[str]
    train_set: "Dataset"
    device: "torch.device"


@dataclass
class StepOutputs:
    """One batch: labels, logits and the requested features of the new and (if needed) old model."""

    labels: "torch.Tensor"
    logits: "torch.Tensor"
    old_logits: Optional["torch.Tensor"] = None
    features: Optional[Dict[str, "torch.Tensor"]] = None
    old_features: Optional[Dict[str, "torch.Tensor"]] = None


class DataPass:
    """What a method computes in one pass of the old model over the step's training set, before
    training (the batches of epoch 0, in the training order, with the training augmentation).

    The engine owns the accumulator: ``new_counts(device)`` makes it (an integer tensor, so that
    summing it over the processes is exact and the result does not depend on the process
    count), ``add_batch(counts, labels, old_logits)`` adds one batch of this process to it, and
    ``finish(total)`` receives the sum over every process and batch. A pass stopped by a signal
    is saved as its accumulator and resumed from it.
    """

    #: Shown in the progress bar and the log.
    name: str = "a pass over the training set"

    def new_counts(self, device: "torch.device") -> "torch.Tensor":
        raise NotImplementedError

    def add_batch(self, counts: "torch.Tensor", labels: "torch.Tensor", old_logits: "torch.Tensor") -> None:
        raise NotImplementedError

    def finish(self, counts: "torch.Tensor") -> None:
        raise NotImplementedError


class Method:
    """Base class: a method that adds nothing (every hook is a no-op)."""

    #: ``--method`` name (case-insensitive), paper row and one-line summary (README's table).
    name: str = ""
    paper_row: str = ""
    summary: str = ""
    #: Options ``--method`` fills in on every task.
    preset: Preset = {}
    #: Options of this method that act only at steps t > 0, and options that change no number.
    incremental_options: FrozenSet[str] = frozenset()
    neutral_options: FrozenSet[str] = frozenset()
    #: Options of this method whose value must be >= 0.
    non_negative_options: FrozenSet[str] = frozenset()
    #: The label protocol (``--label_protocol``) a run with this method's options uses by default.
    label_protocol: str = "mib"

    # ------------------------------------------------------------ command line (no torch)
    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        """Add the options this method owns (once per defining class, see ``option_owners``)."""

    @classmethod
    def check_options(cls, config: Config) -> Optional[str]:
        """An error message when the parsed options cannot work, naming the option; else None."""
        return None

    @classmethod
    def task_preset(cls, task: str) -> Preset:
        """The options ``--method`` fills in on ``task``."""
        return dict(cls.preset)

    @classmethod
    def domain_preset(cls, task: str) -> Preset:
        """The options ``--method`` fills in on a domain-incremental task (the same classes at
        every step, new cities)."""
        return cls.task_preset(task)

    @classmethod
    def preset_note(cls, task: str, option: str, value: object) -> str:
        """Said in the log after ``option=value`` when ``--method`` filled it in ("" for nothing)."""
        return ""

    @classmethod
    def active(cls, config: Config) -> bool:
        """Whether this method takes part in a run with ``config``."""
        return False

    @classmethod
    def launch_warnings(cls, config: Config) -> List[str]:
        """Warnings logged at the start of a run with ``config`` (this method active)."""
        return []

    @classmethod
    def state_name(cls) -> str:
        """Key of this method's state in checkpoints."""
        return cls.name.lower()

    # ------------------------------------------------------------ one step
    def __init__(self, config: Config, step: StepInfo) -> None:
        self.config = config
        self.step = step

    @property
    def needs_old_model(self) -> bool:
        return False

    @property
    def feature_names(self) -> FrozenSet[str]:
        return frozenset()

    @property
    def uses_gradients(self) -> bool:
        """Whether ``observe_gradients``/``add_gradients`` do anything (the trainer skips them)."""
        return False

    def initialize_weights(self, model: "nn.Module") -> None:
        """Change the step's model (step t-1 weights loaded, still on the CPU) before training."""

    def begin_step(self, start: StepStart) -> None:
        """Prepare the step: state from the previous checkpoint, a pass over the data, ..."""

    def data_pass(self) -> Optional[DataPass]:
        """A pass over the training set to run before training (None: none)."""
        return None

    def classification(self) -> Optional["nn.Module"]:
        """The per-pixel classification loss (``reduction="none"``) if this method replaces
        cross-entropy at this step, else None."""
        return None

    def loss_terms(self, outputs: StepOutputs) -> Dict[str, "torch.Tensor"]:
        """This method's weighted loss terms (scalar tensors), named as they are logged."""
        return {}

    def observe_gradients(self) -> None:
        """Read the loss gradients (``.grad``, unscaled) after the backward."""

    def add_gradients(self) -> Dict[str, "torch.Tensor"]:
        """Add gradients of terms this method computes itself; returns their values for the log."""
        return {}

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """In-step state for an exact resume (None: nothing to keep)."""
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s output."""

    def step_state(self) -> Optional[Dict[str, Any]]:
        """What the step checkpoint carries to the next step (None: nothing)."""
        return None


def option_owners(methods: List[type]) -> List[type]:
    """The classes that define ``add_options`` for ``methods``, each once, in order (EWC, PI and RW
    share the options of their common base class)."""
    owners: Dict[type, None] = {}
    for method in methods:
        owner = next(cls for cls in method.__mro__ if "add_options" in cls.__dict__)
        owners[owner] = None
    return list(owners)
