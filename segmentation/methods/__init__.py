"""The methods of the MiB paper's tables and PLOP, one class per module (``segmentation.methods.method``
describes what a method is). Adding one: a new module with its ``Method`` subclass and a line in
``REGISTRY`` below.

Nothing imported here loads torch, so the command line is parsed (and answers mistakes) before
torch is loaded. Joint training is not a method: it is the ``offline`` task (all classes in one
step) trained with plain cross-entropy.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Type

from segmentation.config import Config
from segmentation.methods.ewc import EWC
from segmentation.methods.ft import FT
from segmentation.methods.ilt import ILT
from segmentation.methods.lwf import LwF
from segmentation.methods.lwf_mc import LwFMC
from segmentation.methods.method import Method, Preset, option_owners
from segmentation.methods.mib import MiB
from segmentation.methods.pi import PI
from segmentation.methods.plop import PLOP
from segmentation.methods.rw import RW

#: ``--method`` name -> class, in the paper's row order. When several methods are active, the
#: first one here that replaces the classification loss decides it.
REGISTRY: Dict[str, Type[Method]] = {method.name: method for method in (FT, PI, EWC, RW, LwF, LwFMC, ILT, MiB, PLOP)}


def method_names() -> List[str]:
    return list(REGISTRY)


def find_method(name: str) -> Optional[Type[Method]]:
    """The method called ``name``, case-insensitive, ``_`` and ``-`` alike (``MIB``, ``lwf_mc``)."""
    key = name.lower().replace("_", "-")
    for method in REGISTRY.values():
        if method.name.lower() == key:
            return method
    return None


def method_preset(name: str, task: str, domain_incremental: bool = False) -> Preset:
    """The options that ``--method name`` fills in on ``task`` (of a domain-incremental dataset)."""
    method = find_method(name)
    if method is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return method.domain_preset(task) if domain_incremental else method.task_preset(task)


def active_methods(config: Config) -> List[Type[Method]]:
    """The methods taking part in a run with ``config``, in registry order."""
    return [method for method in REGISTRY.values() if method.active(config)]


def methods_option_owners() -> List[type]:
    """The classes that add command-line options, each once."""
    return option_owners(list(REGISTRY.values()))


def step0_independent_options() -> frozenset:
    """Options of any method that act only from step 1 on."""
    return frozenset().union(*(method.incremental_options for method in REGISTRY.values()))


def neutral_options() -> frozenset:
    """Options of any method that change no number."""
    return frozenset().union(*(method.neutral_options for method in REGISTRY.values()))


def non_negative_options() -> frozenset:
    """Options of any method whose value must be >= 0."""
    return frozenset().union(*(method.non_negative_options for method in REGISTRY.values()))


def shares_step0(name: str) -> bool:
    """Whether ``--method name``'s step 0 is plain cross-entropy training with MiB's labels (its
    preset acts only from step 1 on), so one step-0 model serves it and every other such method."""
    independent = step0_independent_options()
    return (all(option in independent for option in method_preset(name, "").keys())
            and find_method(name).label_protocol == "mib")


__all__ = ["Method", "REGISTRY", "active_methods", "find_method", "method_names", "method_preset",
           "methods_option_owners", "neutral_options", "non_negative_options", "shares_step0",
           "step0_independent_options"]
