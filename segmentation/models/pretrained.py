"""ImageNet weights for the ResNet body: In-Place ABN checkpoints and torchvision state dicts.

Two formats are recognised:

* In-Place ABN ImageNet checkpoint: ``{"state_dict": {"module.mod1.conv1.weight", ...}}``,
  saved from a DDP-wrapped model, with an ImageNet classifier ``classifier.*`` and (In-Place ABN
  1.0.x) no ``num_batches_tracked`` buffers. Its norm weights use the In-Place ABN convention
  (effective scale ``|gamma| + eps``).
* torchvision ResNet state dict (``conv1.weight``, ``layer1.0.conv1.weight``, ``...downsample.0``,
  ``fc.*``), whose norm weights are plain BatchNorm weights.

Norm weights are converted so that the body's forward in eval mode equals the source model's
whatever the body's norm layer (plain ABN uses ``gamma`` as is, In-Place ABN ``|gamma| + eps``).
"""
from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any, Union

import torch
import torch.nn as nn

from .norm import InPlaceABN

StateDict = dict[str, torch.Tensor]

LOGGER = logging.getLogger(__name__)

_TORCHVISION_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_TORCHVISION_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(.+)$")
_TORCHVISION_BLOCK_PARTS = {"downsample.0": "proj_conv", "downsample.1": "proj_bn"}


def load_imagenet_weights(body: nn.Module, path_or_state: Union[str, os.PathLike, Mapping[str, Any]]) -> None:
    """Load ImageNet weights (a file path or an already loaded dict) into a ResNet body, strictly.

    Raises FileNotFoundError for a missing file and ValueError, naming the file and the
    missing / unexpected / mismatched keys, when the weights do not fit the body.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source = os.fspath(path_or_state)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"pretrained weights file {source!r} not found")
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    else:
        source = "the given state dict"
        checkpoint = path_or_state
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source}: expected a dict of weights, got {type(checkpoint).__name__}")

    if "state_dict" in checkpoint:
        if not isinstance(checkpoint["state_dict"], Mapping):
            raise ValueError(f"{source}: 'state_dict' is a {type(checkpoint['state_dict']).__name__}, not a dict")
        state = _from_inplace_abn(checkpoint["state_dict"], body)
    elif "conv1.weight" in checkpoint:
        state = _from_torchvision(checkpoint, body)
    else:
        raise ValueError(
            f"{source}: unrecognised weights format: expected an In-Place ABN ImageNet checkpoint (a dict with "
            f"'state_dict') or a torchvision ResNet state dict (keys 'conv1.weight', 'layer1.0.conv1.weight', ...); "
            f"found keys {_first_keys(list(checkpoint))}"
        )
    _load_strict(body, state, source)


def torchvision_weights_url(backbone: str) -> str:
    """The URL of torchvision's ImageNet weights (IMAGENET1K_V1, the original recipe) for ``backbone``, e.g. "resnet101"."""
    import torchvision  # here, not at the top: its import costs every process seconds (see data.transforms)

    return torchvision.models.get_model_weights(backbone).IMAGENET1K_V1.url


def torchvision_weights_path(backbone: str) -> str:
    """Where torchvision keeps those weights: ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>``
    (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``)."""
    file_name = os.path.basename(urllib.parse.urlparse(torchvision_weights_url(backbone)).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def fetch_torchvision_weights(backbone: str, progress: bool = True) -> str:
    """Download torchvision's ImageNet weights of ``backbone`` into torch hub's cache unless they are
    there; returns the file. Raises OSError (``urllib.error.URLError`` offline) when the download fails."""
    path = torchvision_weights_path(backbone)
    if not os.path.isfile(path):
        url = torchvision_weights_url(backbone)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        LOGGER.info("Downloading torchvision's ImageNet weights of %s: %s to %s", backbone, url, path)
        # Written to a temporary file moved into place when complete: no partial file in the cache.
        torch.hub.download_url_to_file(url, path, progress=progress)
    return path


def cached_torchvision_weights(backbone: str) -> str:
    """The file of torchvision's ImageNet weights of ``backbone`` in torch hub's cache, never downloaded
    here (``fetch_torchvision_weights`` does, as train.py's checks do on rank 0).

    Raises FileNotFoundError, naming the file and the URL, when it is not there.
    """
    path = torchvision_weights_path(backbone)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"torchvision's ImageNet weights of {backbone} are not in the torch hub cache: {path} not found "
            f"(download {torchvision_weights_url(backbone)} there, or call fetch_torchvision_weights({backbone!r}))")
    return path


def _from_inplace_abn(checkpoint_state: Mapping[str, torch.Tensor], body: nn.Module) -> StateDict:
    state = {}
    for key, value in checkpoint_state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if not key.startswith("classifier."):
            state[key] = value
    if not _uses_abs_scale(body):
        # Plain BN: gamma' = |gamma| + eps gives the In-Place ABN forward.
        for name, norm in _norm_layers(body):
            weight_key = f"{name}.weight"
            if weight_key in state:
                state[weight_key] = state[weight_key].abs() + norm.eps
    return state


def _from_torchvision(checkpoint_state: Mapping[str, torch.Tensor], body: nn.Module) -> StateDict:
    state = {}
    for key, value in checkpoint_state.items():
        if key.startswith("fc."):
            continue
        state[_torchvision_key(key)] = value
    if _uses_abs_scale(body):
        _torchvision_to_abs_scale(state, body)
    return state


def _torchvision_key(key: str) -> str:
    """Our name for a torchvision ResNet key; unknown keys are returned unchanged (and rejected later)."""
    stem = _TORCHVISION_STEM.match(key)
    if stem:
        return f"mod1.{stem.group(1)}.{stem.group(2)}"
    block = _TORCHVISION_BLOCK.match(key)
    if block:
        layer, index, part, param = block.groups()
        part = _TORCHVISION_BLOCK_PARTS.get(part, f"convs.{part}")
        return f"mod{int(layer) + 1}.block{int(index) + 1}.{part}.{param}"
    return key


def _torchvision_to_abs_scale(state: StateDict, body: nn.Module) -> None:
    """Rewrite plain-BN weights for a layer whose effective scale is ``|gamma| + eps``.

    gamma' = |gamma| - eps. Where gamma < 0, the preceding conv (bias-free) has its output
    channel negated and the running mean is negated too, so that
    ``|gamma| * (-x + mean) / std + beta == gamma * (x - mean) / std + beta`` exactly.
    (A |gamma| below eps cannot be represented; such a channel gets scale 2 eps - |gamma|.)
    """
    for name, norm in _norm_layers(body):
        weight_key = f"{name}.weight"
        if weight_key not in state:
            continue
        gamma = state[weight_key]
        negative = gamma < 0
        state[weight_key] = gamma.abs() - norm.eps
        if not bool(negative.any()):
            continue
        # The conv feeding "x.bn2" is "x.conv2"; the one feeding "x.proj_bn" is "x.proj_conv".
        prefix, _, norm_name = name.rpartition(".")
        conv_key = f"{prefix}.{norm_name.replace('bn', 'conv')}.weight"
        mean_key = f"{name}.running_mean"
        if conv_key not in state or mean_key not in state:
            continue  # incomplete file: the strict check reports the missing keys
        sign = torch.where(negative, -1.0, 1.0)
        state[conv_key] = state[conv_key] * sign.to(state[conv_key].dtype).view(-1, 1, 1, 1)
        state[mean_key] = state[mean_key] * sign.to(state[mean_key].dtype)


def _uses_abs_scale(body: nn.Module) -> bool:
    """Whether the body's norm layers are In-Place ABN (effective scale ``|gamma| + eps``)."""
    return any(isinstance(module, InPlaceABN) for module in body.modules())


def _norm_layers(body: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in body.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _load_strict(body: nn.Module, state: StateDict, source: str) -> None:
    expected = body.state_dict()
    # In-Place ABN 1.0.x checkpoints have no num_batches_tracked buffers; keep the body's.
    for key, value in expected.items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = value
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_first_keys(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_first_keys(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {_first_keys(mismatched)}")
        raise ValueError(f"pretrained weights {source} do not fit the backbone: " + "; ".join(problems))
    body.load_state_dict(state, strict=True)


def _first_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
