"""The methods of the paper's tables. Adding one: a new module with a ``METHOD`` and a line below.

Each module holds the method's preset (the loss options ``--method`` fills in) and, for EWC, PI
and RW, its weight regularizer. The losses themselves are combined from those options by
``segmentation.engine.methods.MethodLoss``. Joint training is not a method: it is the ``offline``
task (all classes in one step) trained with plain cross-entropy.
"""
from __future__ import annotations

from typing import Dict, Optional

from segmentation.methods import ewc, ft, ilt, lwf, lwf_mc, mib, pi, rw
from segmentation.methods.method import Method, Preset
from segmentation.methods.regularizer import Regularizer

REGISTRY: Dict[str, Method] = {
    module.METHOD.name: module.METHOD
    for module in (ft, pi, ewc, rw, lwf, lwf_mc, ilt, mib)  # the paper's row order
}

#: ``--regularizer`` choices and their classes.
REGULARIZERS: Dict[str, type] = {
    method.regularizer.name: method.regularizer
    for method in REGISTRY.values() if method.regularizer is not None
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


def build_regularizer(name: str, model, previous, previous_weights, *, weight: float, normalize: bool,
                      alpha: float, iterations: int) -> Regularizer:
    """The ``--regularizer name`` regularizer of ``model`` (see ``regularizer.Regularizer``)."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; available: {', '.join(REGULARIZERS)}")
    return REGULARIZERS[name](model, previous, previous_weights, weight=weight, normalize=normalize,
                              alpha=alpha, iterations=iterations)


__all__ = ["Method", "REGISTRY", "REGULARIZERS", "build_regularizer", "find_method", "method_names",
           "method_preset"]
