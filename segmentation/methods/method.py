"""What a method is: a name, the paper row it reproduces and the loss options it presets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

Preset = Dict[str, object]


@dataclass(frozen=True)
class Method:
    """One row of the paper's tables.

    ``preset``: the options ``--method`` fills in (explicit flags win); ``task_preset(task)``
    returns task-specific changes on top of it. ``regularizer``: the ``--regularizer`` name of the
    weight regularizer (EWC, PI, RW; classes in ``segmentation.methods.regularizer``).
    """

    name: str
    paper_row: str
    summary: str
    preset: Preset = field(default_factory=dict)
    task_preset: Optional[Callable[[str], Preset]] = None
    regularizer: Optional[str] = None

    def options(self, task: str) -> Preset:
        """The preset of this method on ``task``."""
        values = dict(self.preset)
        if self.task_preset is not None:
            values.update(self.task_preset(task))
        return values
