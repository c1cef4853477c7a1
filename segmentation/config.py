"""The typed, read-only configuration of a run, built once from the parsed command line.

``segmentation.engine.options.parse_options`` resolves the command line (presets, steps, learning
rates, mixed precision, ImageNet weights) and returns a ``Config``; nothing changes it afterwards.
The engine's options are fields; the methods' own options (each method adds them to the command
line, ``segmentation.methods``) are in ``config.methods``, read as ``config.methods.loss_kd``.

``as_dict()`` is the flat ``{option: value}`` mapping that checkpoints and results files store and
that the same-name check compares (one key per option, as on the command line).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple


def _frozen(value: Any) -> Any:
    """Lists (``nargs="+"`` options) as tuples, so a read-only configuration holds no mutable value."""
    return tuple(value) if isinstance(value, list) else value


def _stored(value: Any) -> Any:
    """Tuples back as lists, as the options were stored before the configuration was typed."""
    return list(value) if isinstance(value, tuple) else value


class MethodOptions(Mapping[str, Any]):
    """The methods' own options, read-only: ``options.loss_kd`` or ``options["loss_kd"]``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", {name: _frozen(value) for name, value in values.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no method option {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to method option {name!r}")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodOptions) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items(), key=lambda item: item[0])))

    def __repr__(self) -> str:
        return f"MethodOptions({self._values!r})"


@dataclass(frozen=True)
class Config:
    """Every option of a run, resolved. Field meanings: ``train.py --help``."""

    # data
    data_root: str
    dataset: str
    allow_synthetic_in_data_root: bool
    allow_regenerated_splits: bool
    split_dir: Optional[str]
    num_workers: int
    # incremental task; ``label_protocol`` is resolved ("mib" or "plop"), ``data_masking`` is
    # "current" on ADE (which ignores it)
    task: str
    steps: Tuple[int, ...]
    overlap: bool
    no_mask: bool
    label_protocol: str
    data_masking: str
    ignore_test_bg: bool
    # domain-incremental datasets: how a city's images divide into training and held-out ones
    domain_split: str
    # method
    method: Optional[str]
    freeze: bool
    # optimisation: ``lr`` is step 0's learning rate, ``incremental_lr`` (None: ``lr``) the later steps'
    lr: float
    incremental_lr: Optional[float]
    epochs: int
    batch_size: int
    crop_size: int
    momentum: float
    weight_decay: float
    lr_policy: str
    lr_power: float
    lr_decay_step: int
    lr_decay_factor: float
    fix_bn: bool
    random_seed: int
    # model: ``pretrained`` is the resolved ImageNet weights (a path, "torchvision" or None)
    backbone: str
    output_stride: int
    norm_act: str
    pretrained: Optional[str]
    no_pretrained: bool
    pooling: int
    # mixed precision and performance
    amp: str
    dtype: str
    channels_last: bool
    device: str
    norm_kernels: str
    tf32: str
    # checkpoints and resuming
    checkpoint_dir: str
    step_ckpt: Optional[str]
    ckpt: Optional[str]
    ckpt_interval: int
    resume: bool
    overwrite: bool
    max_bad_iterations: int
    # evaluation
    test: bool
    val_interval: int
    cross_val: bool
    test_on_val: bool
    val_on_trainset: bool
    eval_full_image: bool
    # logging
    name: str
    logdir: str
    visualize: bool
    debug: bool
    sample_num: int
    print_interval: int
    # distributed
    local_rank: Optional[int]
    dist_backend: str
    collective_timeout: float
    # the methods' own options
    methods: MethodOptions = field(default_factory=lambda: MethodOptions({}))
    # lines the run logs at its start: what a preset filled in, ignored options
    notes: Tuple[str, ...] = ()

    @classmethod
    def from_values(cls, values: Mapping[str, Any], notes: List[str] = ()) -> "Config":
        """A configuration from a flat ``{option: value}`` mapping: the engine's options become
        fields, every other option a method option."""
        names = {item.name for item in dataclasses.fields(cls)} - {"methods", "notes"}
        missing = sorted(names - set(values))
        if missing:
            raise ValueError(f"options missing from the configuration: {', '.join(missing)}")
        engine = {name: _frozen(value) for name, value in values.items() if name in names}
        methods = MethodOptions({name: value for name, value in values.items() if name not in names})
        return cls(**engine, methods=methods, notes=tuple(notes))

    def as_dict(self) -> Dict[str, Any]:
        """Every option, flat (the methods' too), as checkpoints and results files store them."""
        values = {item.name: _stored(getattr(self, item.name)) for item in dataclasses.fields(self)
                  if item.name not in ("methods", "notes")}
        values.update({name: _stored(value) for name, value in self.methods.items()})
        values["notes"] = list(self.notes)
        return values

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes``, engine and method options alike (tests and benchmarks)."""
        values = self.as_dict()
        unknown = sorted(set(changes) - set(values))
        if unknown:
            raise ValueError(f"unknown options: {', '.join(unknown)}")
        values.update(changes)
        return Config.from_values(values, values.pop("notes"))
