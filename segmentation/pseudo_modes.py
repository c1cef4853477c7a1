"""The values of ``--pseudo`` (PLOP's pseudo-label modes), without torch: read while the command
line is parsed (``segmentation.methods.plop``) and by ``segmentation.pseudo_labels``."""
from __future__ import annotations

import math
from typing import Optional

#: The modes the original's training loop acts on, besides ``threshold_<p>``.
PSEUDO_MODES = ("entropy", "median", "naive", "confidence")
THRESHOLD_PREFIX = "threshold_"


def threshold_probability(mode: str) -> Optional[float]:
    """p of ``threshold_<p>``, or None for a mode without that prefix; ``ValueError`` unless
    0 < p <= 1 (the original read ``threshold_5`` as p = 5 and ignored every background pixel)."""
    if not mode.startswith(THRESHOLD_PREFIX):
        return None
    try:
        probability = float(mode[len(THRESHOLD_PREFIX):])
    except ValueError:
        probability = math.nan
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"pseudo mode {mode!r}: the probability of threshold_<p> must be in (0, 1]")
    return probability
