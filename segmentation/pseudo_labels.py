"""PLOP's pseudo-labels of the background (Douillard et al., CVPR 2021): pure functions.

Shapes: ``labels`` (B, H, W) int64 channel indices, 255 = ignore; ``old_logits`` (B, C_old, H, W)
the old model's upsampled logits over its C_old channels (background, channel 0, included);
C_t = all channels of the current step (old + new).

**Uncertainty.** ``u = H(p) / (C_old * ln C_old * ln C_t)`` with p the old model's softmax and H
the natural-log entropy, computed as the original did: ``-(1 / ln(C_old + 1e-8)) * mean_c p_c
ln(p_c + 1e-8)``, then divided by ln C_t. So ``u`` lies in ``[0, max_uncertainty(C_old, C_t)]``
= ``[0, 1 / (C_old ln C_t)]``, e.g. about 0.02 on VOC 15-5 and 0.002 on ADE 100-50.

**Per-class thresholds** (once per step, before training). One pass of the old model over the
step's training set adds each background pixel to ``histograms[predicted class, bin of its
value]`` (:func:`add_to_histograms`); the value is ``u`` (``"entropy"`` mode) or the old max
probability (``"probability"`` mode, ``--pseudo median``). Then, per class:

- :func:`original_thresholds`: the original's histogram walk, reproduced with its bugs
  (100 or 20 bins over [0, 1], see ``ORIGINAL_BINS``). It does not find a median: it stops at
  about the first bin holding half of the class's pixels, or runs through and gives +-inf.
- :func:`median_thresholds`: the per-class median, from a fine histogram (``MEDIAN_BINS`` over
  ``[0, max_uncertainty]`` or [0, 1]).

Both then floor the thresholds at ``--threshold`` (entropy mode) or cap them at it (probability
mode). They are float64 tensors; the original's walk computed in float32, and its values are kept
exactly. The counts are int64, so a caller may sum them over processes exactly; the original did
not (each rank used its own shard's thresholds).

**Which pixels are background.** The original's histogram pass counted only pixels labelled 0,
while relabelling treats every label below C_old as background; the two differ under
``--data_masking current+old``, where old-class pixels are relabelled but never counted. The
caller passes the histogram mask (``labels == 0`` for the original's behaviour);
:func:`pseudo_label` uses ``labels < C_old``.

**Modes** of :func:`pseudo_label` (``--pseudo``): ``PSEUDO_MODES`` or ``threshold_<p>`` with
0 < p <= 1 (e.g. ``threshold_0.5``). The original read ``threshold_5`` as p = 5 (every background
pixel ignored) and silently used no pseudo-labels for ``entropy_<x>`` / ``median_<x>``; both are
refused here and by the option check.

**Differences from the original** (fixes):

- The original's walk could stop on an empty bin with half the count equal to its running sum,
  giving 0/0 = NaN; its floor (Python ``max``) kept the NaN and every pixel predicted as that
  class was ignored. Here the fraction inside that bin is 0 (threshold = the bin's lower edge).
- ``pseudo_label`` raises on ``adaptive_factor`` outside the entropy mode (the original ignored it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from segmentation.pseudo_modes import PSEUDO_MODES, THRESHOLD_PREFIX, threshold_probability

IGNORE_INDEX = 255
THRESHOLD_MODES = ("entropy", "probability")
# The original's histogram sizes (--pseudo_nb_bins overrides them), over [0, 1].
ORIGINAL_BINS = {"entropy": 100, "probability": 20}
# The median variant's histogram size: its median is exact to within one bin width.
MEDIAN_BINS = 4096
# ν's denominator guard: an image without background pixels gets ν = 0.
_NU_EPSILON = 1e-6


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_channels(num_old_channels: int, num_channels: int) -> None:
    if num_old_channels < 2 or num_channels < num_old_channels:
        raise ValueError(
            f"need 2 <= num_old_channels <= num_channels; got {num_old_channels} and {num_channels}"
        )


def _check_threshold_mode(mode: str) -> None:
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; valid: {', '.join(THRESHOLD_MODES)}")


def _check_histograms(histograms: torch.Tensor) -> None:
    if histograms.dim() != 2 or histograms.shape[1] < 1 or histograms.dtype != torch.int64:
        raise ValueError(
            f"histograms must be a (C_t, bins) int64 tensor; got {tuple(histograms.shape)} {histograms.dtype}"
        )


def _probabilities(old_logits: torch.Tensor) -> torch.Tensor:
    if old_logits.dim() != 4:
        raise ValueError(f"old_logits must be (B, C_old, H, W); got {tuple(old_logits.shape)}")
    return torch.softmax(_at_least_float32(old_logits), dim=1)


def _uncertainty(probabilities: torch.Tensor, num_channels: int) -> torch.Tensor:
    num_old = probabilities.shape[1]
    _check_channels(num_old, num_channels)
    entropy = -(1.0 / math.log(num_old + 1e-8)) * (probabilities * torch.log(probabilities + 1e-8)).mean(dim=1)
    return entropy / math.log(num_channels)


def entropy_uncertainty(old_logits: torch.Tensor, num_channels: int) -> torch.Tensor:
    """``u = H(p) / (C_old ln C_old ln C_t)`` per pixel, (B, H, W), in float32 or wider."""
    return _uncertainty(_probabilities(old_logits), num_channels)


def max_probability(old_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The old model's max probability (float32 or wider) and its channel (int64), both (B, H, W)."""
    values, predicted = _probabilities(old_logits).max(dim=1)
    return values, predicted


def max_uncertainty(num_old_channels: int, num_channels: int) -> float:
    """The largest ``u``, ``1 / (C_old ln C_t)`` (uniform old probabilities)."""
    _check_channels(num_old_channels, num_channels)
    return 1.0 / (num_old_channels * math.log(num_channels))


def add_to_histograms(
    histograms: torch.Tensor,
    values: torch.Tensor,
    predicted: torch.Tensor,
    mask: torch.Tensor,
    value_range: float = 1.0,
) -> None:
    """Count each pixel where ``mask`` holds in ``histograms[predicted, bin]``, in place.

    ``bin = min(floor(value / value_range * bins), bins - 1)``, negatives in bin 0. With
    ``value_range = 1`` this is the original's ``min(int(value * bins), bins - 1)``.
    """
    _check_histograms(histograms)
    if not values.shape == predicted.shape == mask.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"values, predicted and a bool mask must share one shape; got {tuple(values.shape)}, "
            f"{tuple(predicted.shape)} and {tuple(mask.shape)} {mask.dtype}"
        )
    if not value_range > 0:
        raise ValueError(f"value_range must be positive; got {value_range}")
    bins = histograms.shape[1]
    positions = torch.floor(values[mask] / value_range * bins).clamp(0, bins - 1).long()
    classes = predicted[mask].long()
    histograms.index_put_((classes, positions), torch.ones_like(positions), accumulate=True)


def _original_walk(counts: torch.Tensor) -> float:
    """The original's "median" of one non-empty histogram row (int64, CPU), bins over [0, 1].

    Its arithmetic mixed float32 tensors with Python floats, which are rounded to float32 in each
    operation; the rounding decides ties (28.999999999999996 becomes 29.0), so it is kept here.
    """
    bins = counts.numel()
    counts = counts.to(torch.float32)
    half = counts.sum() / 2
    running = 0.0
    for k in range(bins):
        # In floating point this is k - 1 + 0.99999... for some k (29, 57, 58 with 100 bins): the
        # walk then reads the previous bin, and adds that non-integer to its running sum.
        position = k / bins * bins
        count = counts[int(position)]
        if running <= half <= running + count:
            break
        # The original's bug: it adds the bin's position, not its count.
        running += position
    # Without a stop, k and count are those of the last bin.
    excess = half - running
    if count == 0 and excess == 0:
        # Fix: the original computed 0/0 = NaN here.
        fraction = torch.zeros((), dtype=torch.float32)
    else:
        # +inf or -inf on an empty bin, as in the original.
        fraction = excess / count
    return (k / bins + fraction * (1 / bins)).item()


def _floor_or_cap(medians: torch.Tensor, floor: float, mode: str) -> torch.Tensor:
    bound = torch.tensor(floor, dtype=medians.dtype)
    return torch.maximum(medians, bound) if mode == "entropy" else torch.minimum(medians, bound)


def original_thresholds(histograms: torch.Tensor, floor: float, mode: str) -> torch.Tensor:
    """Per-class thresholds (C_t,) float64 from the histograms, with the original's walk.

    For each class with pixels: ``half = total / 2``, ``running = 0``; for each bin k, stop if
    ``running <= half <= running + count`` (the count read at ``int(k / bins * bins)``, which is
    bin k - 1 for some k), else ``running += k`` (a bug: the bin index, not the count). The
    threshold is ``k / bins + (half - running) / count / bins`` at the stop, or with the last bin
    if the walk never stopped (+-inf when that bin is empty). Empty classes get 0. Then
    ``max(., floor)`` in ``"entropy"`` mode and ``min(., floor)`` in ``"probability"`` mode.
    The arithmetic is the original's float32; the values are returned as float64.

    Difference: where the original stopped on an empty bin with ``half == running`` (0/0 = NaN,
    which its floor kept, so the class's pixels were all ignored), the fraction here is 0.
    """
    _check_histograms(histograms)
    _check_threshold_mode(mode)
    rows = histograms.cpu()
    medians = torch.zeros(histograms.shape[0], dtype=torch.float32)
    for c in range(rows.shape[0]):
        if rows[c].sum() > 0:
            medians[c] = _original_walk(rows[c])
    return _floor_or_cap(medians, floor, mode).to(torch.float64).to(histograms.device)


def _histogram_median(counts: List[int], width: float) -> float:
    half = sum(counts) / 2
    running = 0
    for k, count in enumerate(counts):
        if running + count >= half:
            # count > 0 here: running < half <= running + count.
            return (k + (half - running) / count) * width
        running += count
    raise AssertionError("unreachable: the counts add up to 2 * half")


def median_thresholds(histograms: torch.Tensor, value_range: float, floor: float, mode: str) -> torch.Tensor:
    """Per-class median thresholds (C_t,) float64 from histograms over ``[0, value_range]``.

    The median is interpolated linearly inside the bin where the cumulative count reaches half
    of the class's pixels, so it lies within one bin width of the class's lower median value (for
    a large sample, of ``torch.quantile(values, 0.5)``). Empty classes get 0. Then
    ``max(., floor)`` in ``"entropy"`` mode and ``min(., floor)`` in ``"probability"`` mode.
    """
    _check_histograms(histograms)
    _check_threshold_mode(mode)
    if not value_range > 0:
        raise ValueError(f"value_range must be positive; got {value_range}")
    width = value_range / histograms.shape[1]
    medians = torch.zeros(histograms.shape[0], dtype=torch.float64)
    for c, counts in enumerate(histograms.cpu().tolist()):
        if sum(counts) > 0:
            medians[c] = _histogram_median(counts, width)
    return _floor_or_cap(medians, floor, mode).to(histograms.device)


@dataclass
class PseudoLabels:
    """Relabelled targets (B, H, W) int64, and the loss weights a mode asks for (else None):
    ``image_weights`` (B,) ν per image, ``pixel_weights`` (B, H, W) per-pixel weights."""

    labels: torch.Tensor
    image_weights: Optional[torch.Tensor] = None
    pixel_weights: Optional[torch.Tensor] = None


def _class_thresholds(thresholds: Optional[torch.Tensor], mode: str, num_channels: int) -> torch.Tensor:
    if thresholds is None or thresholds.shape != (num_channels,):
        shape = None if thresholds is None else tuple(thresholds.shape)
        raise ValueError(f"pseudo mode {mode!r} needs thresholds of shape ({num_channels},); got {shape}")
    return thresholds


def pseudo_label(
    labels: torch.Tensor,
    old_logits: torch.Tensor,
    mode: str,
    num_old_channels: int,
    num_channels: int,
    thresholds: Optional[torch.Tensor] = None,
    adaptive_factor: bool = False,
    min_factor: float = 0.0,
) -> PseudoLabels:
    """Relabel the background pixels (labels < C_old) from the old model; ``labels`` is not modified.

    With ĉ the old model's argmax (may be 0, background) and p its max probability, a background
    pixel gets ĉ if accepted, else 255:

    - ``entropy``: accepted if ``u < thresholds[ĉ]`` (``u`` of :func:`entropy_uncertainty`). With
      ``adaptive_factor``, ``image_weights`` = ν_b = |accepted background| / (|background| + 1e-6)
      per image (255 pixels are not background; no background gives 0), clamped below by
      ``min_factor`` when it is positive.
    - ``naive``: always accepted.
    - ``confidence``: always accepted; ``pixel_weights`` = p on background pixels, 1 elsewhere.
    - ``threshold_<p>``: accepted if the max probability >= the mode's p.
    - ``median``: accepted if the max probability >= ``thresholds[ĉ]``.

    Other labels (new classes, 255) are kept. ``thresholds`` (C_t,) are those of
    :func:`original_thresholds` or :func:`median_thresholds`, compared in ``u``'s or ``p``'s dtype
    (float32, as in the original, unless the logits are float64).
    """
    if labels.dim() != 3 or old_logits.dim() != 4 or old_logits.shape[0] != labels.shape[0] \
            or old_logits.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"labels (B, H, W) and old_logits (B, C_old, H, W) must match; got {tuple(labels.shape)} "
            f"and {tuple(old_logits.shape)}"
        )
    if old_logits.shape[1] != num_old_channels:
        raise ValueError(f"old_logits have {old_logits.shape[1]} channels; num_old_channels is {num_old_channels}")
    _check_channels(num_old_channels, num_channels)
    if adaptive_factor and mode != "entropy":
        raise ValueError(f"the adaptive factor is defined only for the entropy mode, not {mode!r}")

    probabilities = _probabilities(old_logits)
    confidence, predicted = probabilities.max(dim=1)
    background = labels < num_old_channels
    image_weights = pixel_weights = None
    if mode == "entropy":
        uncertainty = _uncertainty(probabilities, num_channels)
        tau = _class_thresholds(thresholds, mode, num_channels).to(uncertainty.device, uncertainty.dtype)
        accepted = uncertainty < tau[predicted]
        if adaptive_factor:
            num_accepted = (accepted & background).sum(dim=(1, 2)).float()
            num_background = background.sum(dim=(1, 2)).float()
            image_weights = num_accepted / (num_background + _NU_EPSILON)
            if min_factor > 0:
                image_weights = image_weights.clamp(min=min_factor)
    elif mode in ("naive", "confidence"):
        accepted = torch.ones_like(background)
        if mode == "confidence":
            pixel_weights = torch.where(background, confidence, torch.ones_like(confidence))
    elif mode == "median":
        tau = _class_thresholds(thresholds, mode, num_channels).to(confidence.device, confidence.dtype)
        accepted = confidence >= tau[predicted]
    elif mode.startswith(THRESHOLD_PREFIX):
        accepted = confidence >= threshold_probability(mode)
    else:
        raise ValueError(f"unknown pseudo mode {mode!r}; valid: {', '.join(PSEUDO_MODES)} or threshold_<p>")

    pseudo = torch.where(accepted, predicted, torch.full_like(predicted, IGNORE_INDEX))
    relabelled = torch.where(background, pseudo, labels.long())
    return PseudoLabels(relabelled, image_weights, pixel_weights)
