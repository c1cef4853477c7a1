"""The methods of the paper's tables. Adding one: a new module with a ``METHOD`` and a line below.

Each module holds the method's preset (the loss options ``--method`` fills in). The weight
regularizers of EWC, PI and RW are in ``segmentation.methods.regularizer``, and the losses are
combined from the options by ``segmentation.engine.methods.MethodLoss``. Nothing imported here
loads torch, so the command line is parsed (and answers mistakes) before torch is loaded. Joint training is not a method: it is the ``offline``
task (all classes in one step) trained with plain cross-entropy.
"""
from __future__ import annotations

from typing import Dict, Optional

from segmentation.methods import ewc, ft, ilt, lwf, lwf_mc, mib, pi, rw
from segmentation.methods.method import Method, Preset

REGISTRY: Dict[str, Method] = {
    module.METHOD.name: module.METHOD
    for module in (ft, pi, ewc, rw, lwf, lwf_mc, ilt, mib)  # the paper's row order
}


def method_names() -> list:
    return list(REGISTRY)


def find_method(name: str) -> Optional[Method]:
    """The method called ``name``, case-insensitive, ``_`` and ``-`` alike (``MIB``, ``lwf_mc``)."""
    key = name.lower().replace("_", "-")
    for method in REGISTRY.values():
        if method.name.lower() == key:
            return method
    return None


def method_preset(name: str, task: str) -> Preset:
    """The options that ``--method name`` fills in on ``task``."""
    method = find_method(name)
    if method is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return method.options(task)


__all__ = ["Method", "REGISTRY", "find_method", "method_names", "method_preset"]
