"""PLOP's POD options (``--pod``, ``--pod_factor``, ``--pod_options``, ``--pod_prepro``,
``--spp_scales``, ``--no_pod_schedule``) resolved into one settings record per kind of map.

The distilled maps are the features (every map but the last) and the last map (the logits with
``--pod_logits``). ``--pod_options`` overrides either kind with the original's grammar::

    {"switch": {"before": {...}, "after": {...}}}

``before`` applies to the features, ``after`` to the last map. Keys of both: ``type``,
``factor``, ``norm``, ``prepro``, ``use_adaptative_factor``; keys of ``after`` only:
``extra_channels``, ``spp_scales``, ``use_pod_schedule``. The keys the original also read
(masked POD, other distances, per-scale normalisation) are refused as not implemented.

This module does not import torch: the command-line parser checks the options with it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

POD_TYPES = ("local", "global", "spatial")
# "abs" is |x|; the original called torch.abs(x, 2), which raises, so it could not be used.
POD_PREPROCESSING = ("pow", "none", "relu", "abs")
EXTRA_CHANNELS = ("sum", "trim")
# The original's value when "after" does not set extra_channels (it reset it to "sum" for every map).
DEFAULT_EXTRA_CHANNELS = "sum"

_BOTH_KEYS = ("type", "factor", "norm", "prepro", "use_adaptative_factor")
_AFTER_KEYS = ("extra_channels", "spp_scales", "use_pod_schedule")
_NOT_IMPLEMENTED_AFTER_KEYS = ("apply_mask", "upscale_mask_topk", "mix_new_old")
_NOT_IMPLEMENTED_SWITCH_KEYS = ("mask_position", "normalize_per_scale")
_NOT_IMPLEMENTED_TOP_KEYS = ("pool", "difference_function", "difference_function_all")


@dataclass(frozen=True)
class LayerSettings:
    """How one kind of map is distilled."""

    type: str  # one of POD_TYPES
    factor: float  # the map's weight lambda
    prepro: str  # one of POD_PREPROCESSING
    norm: bool  # L2-normalise each image's embedding before the difference
    use_adaptative_factor: bool  # times the batch's fraction of pixels labelled 0
    extra_channels: str  # one of EXTRA_CHANNELS: how the new logits' extra channels are dropped
    spp_scales: Tuple[int, ...]  # grid sizes of the local and global poolings
    schedule: bool  # times sqrt(C_t / N)


@dataclass(frozen=True)
class PodSettings:
    features: LayerSettings  # every map but the last
    last: LayerSettings  # the last map (the logits with --pod_logits)


def _error(path: str, message: str) -> ValueError:
    where = f"--pod_options {path}" if path else "--pod_options"
    return ValueError(f"{where}: {message}")


def _choice(value: Any, choices: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _factor(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: {value!r} is not a finite number >= 0")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not true or false")
    return value


def _scales(value: Any, name: str) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or any(
            isinstance(scale, bool) or not isinstance(scale, int) or scale < 1 for scale in value):
        raise ValueError(f"{name}: {value!r} is not a non-empty list of integers >= 1")
    return tuple(value)


def _object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _error(path, f"expected a JSON object, got {value!r}")
    return value


def _check_keys(options: Mapping[str, Any], path: str, known: Sequence[str],
                not_implemented: Sequence[str], not_implemented_why: str) -> None:
    prefix = f"{path}." if path else ""
    for key in options:
        if key in not_implemented:
            raise _error(f"{prefix}{key}", f"not implemented ({not_implemented_why})")
        if key not in known:
            raise _error(path, f"unknown key {key!r}; valid: {', '.join(known)}")


def _layer(base: LayerSettings, overrides: Mapping[str, Any], path: str) -> LayerSettings:
    def name(key: str) -> str:
        return f"--pod_options {path}.{key}"

    values = {
        "type": _choice(overrides.get("type", base.type), POD_TYPES, name("type")),
        "factor": _factor(overrides.get("factor", base.factor), name("factor")),
        "prepro": _choice(overrides.get("prepro", base.prepro), POD_PREPROCESSING, name("prepro")),
        "norm": _flag(overrides.get("norm", base.norm), name("norm")),
        "use_adaptative_factor": _flag(overrides.get("use_adaptative_factor", base.use_adaptative_factor),
                                       name("use_adaptative_factor")),
        "extra_channels": base.extra_channels,
        "spp_scales": base.spp_scales,
        "schedule": base.schedule,
    }
    if "extra_channels" in overrides:
        values["extra_channels"] = _choice(overrides["extra_channels"], EXTRA_CHANNELS, name("extra_channels"))
    if "spp_scales" in overrides:
        values["spp_scales"] = _scales(overrides["spp_scales"], name("spp_scales"))
    if "use_pod_schedule" in overrides:
        values["schedule"] = _flag(overrides["use_pod_schedule"], name("use_pod_schedule"))
    return LayerSettings(**values)


def pod_settings(pod: str, pod_factor: float, pod_options: Optional[Union[str, Mapping[str, Any]]],
                 pod_prepro: str, spp_scales: Sequence[int], no_pod_schedule: bool) -> PodSettings:
    """The settings of the features and of the last map from the POD options.

    ``pod_options`` is None, the command line's JSON string or its decoded object. Without an
    override every map gets ``type=pod``, ``factor=pod_factor``, ``prepro=pod_prepro``, no
    normalisation, no adaptive factor, ``spp_scales`` and the schedule unless ``no_pod_schedule``.
    ``extra_channels`` defaults to ``"sum"``: the original's value when ``after`` does not set it
    (the spec does not state it; PLOP's preset and scripts pass ``"sum"`` explicitly).

    One difference from the original: its ``before`` settings leaked into the last map when
    ``after`` did not override them (it kept them in loop variables); here ``after``'s defaults are
    always the plain options above.

    Raises ValueError with a one-line message naming the option (and key path) at fault.
    """
    base = LayerSettings(
        type=_choice(pod, POD_TYPES, "--pod"),
        factor=_factor(pod_factor, "--pod_factor"),
        prepro=_choice(pod_prepro, POD_PREPROCESSING, "--pod_prepro"),
        norm=False,
        use_adaptative_factor=False,
        extra_channels=DEFAULT_EXTRA_CHANNELS,
        spp_scales=_scales(spp_scales, "--spp_scales"),
        schedule=not no_pod_schedule,
    )
    if pod_options is None:
        return PodSettings(features=base, last=base)
    if isinstance(pod_options, str):
        try:
            pod_options = json.loads(pod_options)
        except json.JSONDecodeError as error:
            raise _error("", f"invalid JSON ({error})") from None
    options = _object(pod_options, "")
    _check_keys(options, "", ("switch",), _NOT_IMPLEMENTED_TOP_KEYS, "only the Frobenius distance with pooling")
    switch = _object(options.get("switch", {}), "switch")
    _check_keys(switch, "switch", ("before", "after"), _NOT_IMPLEMENTED_SWITCH_KEYS,
                "no masked POD, no per-scale normalisation")
    before = _object(switch.get("before", {}), "switch.before")
    _check_keys(before, "switch.before", _BOTH_KEYS, _AFTER_KEYS + _NOT_IMPLEMENTED_AFTER_KEYS,
                "the original read it only in switch.after and ignored it here")
    after = _object(switch.get("after", {}), "switch.after")
    _check_keys(after, "switch.after", _BOTH_KEYS + _AFTER_KEYS, _NOT_IMPLEMENTED_AFTER_KEYS,
                "no masked POD, only the Frobenius distance")
    return PodSettings(features=_layer(base, before, "switch.before"), last=_layer(base, after, "switch.after"))
