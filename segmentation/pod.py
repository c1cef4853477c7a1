"""PLOP's POD feature distillation (Local POD by default) between the old and the current model.

For the maps l = 1..L (the old model's ``a_l`` and the current model's ``b_l``, each (B, C, H, W)):

    L_POD = (1/L) sum_l lambda_l * sqrt(C_t / N) * adaptive_l * (1/B) sum_b ||Psi(a_l)_b - Psi(b_l)_b||_2

with the embedding Psi of the map's pooling type (``pod_embedding``) after its element-wise
preprocessing (``prepare``). The norm is the plain (not squared) L2 norm of each image's
difference vector. The schedule sqrt(C_t / N) and the adaptive factor (the batch's fraction of
pixels labelled 0) apply only where the map's settings ask for them. The last map may have more
channels than the old one (the logits); ``reconcile_channels`` brings it to the old count first.

The losses compute in the maps' dtype, half precision upcast to float32 (squared activations
overflow float16). Unlike the original, which accumulated into a float32 scalar, float64 maps give
a float64 loss.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from segmentation.pod_settings import EXTRA_CHANNELS, POD_PREPROCESSING, POD_TYPES, LayerSettings, PodSettings


def prepare(x: torch.Tensor, prepro: str) -> torch.Tensor:
    """Element-wise preprocessing: ``pow`` x^2, ``none``, ``relu`` max(x, 0), ``abs`` |x|."""
    if prepro == "pow":
        return x * x
    if prepro == "none":
        return x
    if prepro == "relu":
        return x.clamp(min=0)
    if prepro == "abs":
        return x.abs()
    raise ValueError(f"unknown POD preprocessing {prepro!r}; valid: {', '.join(POD_PREPROCESSING)}")


def _check_scales(x: torch.Tensor, spp_scales: Sequence[int]) -> None:
    height, width = x.shape[-2:]
    if not spp_scales or any(scale < 1 or scale > min(height, width) for scale in spp_scales):
        raise ValueError(f"POD grid sizes {tuple(spp_scales)} must be in 1..{min(height, width)} "
                         f"for a {height}x{width} map")


def _local_embedding(x: torch.Tensor, spp_scales: Sequence[int]) -> torch.Tensor:
    batch, channels, height, width = x.shape
    pools = []
    for scale in spp_scales:
        kh, kw = height // scale, width // scale
        # (B, C, i, row, j, col): region (i, j) is rows i*kh:(i+1)*kh, columns j*kw:(j+1)*kw;
        # the last H - s*kh rows and W - s*kw columns belong to no region.
        regions = x[:, :, : scale * kh, : scale * kw].reshape(batch, channels, scale, kh, scale, kw)
        horizontal = regions.mean(dim=5).permute(0, 2, 4, 1, 3).reshape(batch, scale, scale, channels * kh)
        vertical = regions.mean(dim=3).permute(0, 2, 3, 1, 4).reshape(batch, scale, scale, channels * kw)
        # Per region, in row-major order: its horizontal then its vertical pool.
        pools.append(torch.cat([horizontal, vertical], dim=3).reshape(batch, -1))
    return torch.cat(pools, dim=1)


def _global_embedding(x: torch.Tensor, spp_scales: Sequence[int]) -> torch.Tensor:
    batch = x.shape[0]
    height, width = x.shape[-2:]
    pools = []
    for scale in spp_scales:
        grid = F.avg_pool2d(x, kernel_size=(height // scale, width // scale))
        pools.append(grid.sum(dim=2).reshape(batch, -1))
        pools.append(grid.sum(dim=3).reshape(batch, -1))
    return torch.cat(pools, dim=1)


def pod_embedding(x: torch.Tensor, type: str, spp_scales: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """The embedding Psi (B, D) of maps x (B, C, H, W).

    - ``local`` (Local POD): for each grid size s and each of its s x s regions in row-major
      order, region (i, j) covering rows i*kh:(i+1)*kh and columns j*kw:(j+1)*kw with
      kh = H // s and kw = W // s, the region's mean over its width (C*kh values) then its mean
      over its height (C*kw values). D = 14*C*W for square maps and grid sizes (1, 2, 4).
      The original used k = W // s for both axes, which is the same on square maps but gave
      NaN (H < W) or dropped the bottom rows (H > W) on other maps.
    - ``spatial`` (PODNet): the sum over the width (C*H values) then over the height (C*W values).
    - ``global``: for each s, the map average-pooled with kernel = stride = (H // s, W // s),
      then that grid summed over its height (C*s values) and over its width (C*s values). As in
      the original, rows and columns beyond the last whole cell are dropped (so a map smaller
      than about s^2 pixels a side can give more than s cells).
    """
    if x.dim() != 4:
        raise ValueError(f"POD maps must be (B, C, H, W); got {tuple(x.shape)}")
    if type == "spatial":
        return torch.cat([x.sum(dim=3).flatten(1), x.sum(dim=2).flatten(1)], dim=1)
    if type not in ("local", "global"):
        raise ValueError(f"unknown POD type {type!r}; valid: {', '.join(POD_TYPES)}")
    _check_scales(x, spp_scales)
    if type == "local":
        return _local_embedding(x, spp_scales)
    return _global_embedding(x, spp_scales)


def reconcile_channels(old: torch.Tensor, new: torch.Tensor, extra_channels: str) -> torch.Tensor:
    """``new`` (B, C_t, H, W) brought to the C_old channels of ``old`` (B, C_old, H, W).

    ``sum``: channel 0 is new_0 plus every channel c >= C_old (raw logits added, not a
    log-sum-exp), channels 1..C_old-1 are copied. ``trim``: the first C_old channels.
    """
    num_old = old.shape[1]
    if new.shape[1] == num_old:
        return new
    if extra_channels == "sum":
        background = new[:, :1] + new[:, num_old:].sum(dim=1, keepdim=True)
        return torch.cat([background, new[:, 1:num_old]], dim=1)
    if extra_channels == "trim":
        return new[:, :num_old]
    raise ValueError(f"unknown extra_channels {extra_channels!r}; valid: {', '.join(EXTRA_CHANNELS)}")


def _check_maps(old_maps: Sequence[torch.Tensor], new_maps: Sequence[torch.Tensor]) -> None:
    if len(old_maps) != len(new_maps) or not new_maps:
        raise ValueError(
            f"POD needs as many old maps as new maps, at least one; got {len(old_maps)} and {len(new_maps)}"
        )
    last = len(new_maps) - 1
    for index, (old, new) in enumerate(zip(old_maps, new_maps)):
        if old.dim() != 4 or new.dim() != 4 or old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:] \
                or old.shape[1] > new.shape[1] or (index < last and old.shape[1] != new.shape[1]):
            raise ValueError(
                f"POD map {index}: old {tuple(old.shape)} and new {tuple(new.shape)} must be (B, C, H, W) of the "
                "same size, with more new channels allowed only on the last map"
            )


def _layer_distance(old: torch.Tensor, new: torch.Tensor, layer: LayerSettings) -> torch.Tensor:
    """(1/B) sum_b ||Psi(old)_b - Psi(new)_b||_2 for one map."""
    dtype = torch.promote_types(torch.promote_types(old.dtype, new.dtype), torch.float32)
    old = old.detach().to(dtype)
    new = reconcile_channels(old, new.to(dtype), layer.extra_channels)
    old_embedding = pod_embedding(prepare(old, layer.prepro), layer.type, layer.spp_scales)
    new_embedding = pod_embedding(prepare(new, layer.prepro), layer.type, layer.spp_scales)
    if layer.norm:
        old_embedding = F.normalize(old_embedding, p=2, dim=1)
        new_embedding = F.normalize(new_embedding, p=2, dim=1)
    return torch.linalg.vector_norm(old_embedding - new_embedding, ord=2, dim=1).mean()


def pod_loss(old_maps: Sequence[torch.Tensor], new_maps: Sequence[torch.Tensor], settings: PodSettings,
             num_channels: int, num_new_channels: int, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_POD over the maps (old model's, current model's), in the original's order.

    The last map uses ``settings.last``, the others ``settings.features``. ``num_channels`` is
    C_t (all channels, background included) and ``num_new_channels`` N, the step's new classes;
    they matter only with the schedule. ``labels`` (any shape) are needed only by the adaptive
    factor. The old maps are constants: no gradient flows to them. A map whose factor is 0 is
    skipped (as in the original) but still counts in L.
    """
    _check_maps(old_maps, new_maps)
    last = len(new_maps) - 1
    layer_losses: List[torch.Tensor] = []
    for index, (old, new) in enumerate(zip(old_maps, new_maps)):
        layer = settings.last if index == last else settings.features
        if layer.factor == 0:
            continue
        loss = layer.factor * _layer_distance(old, new, layer)
        if layer.schedule:
            if not 0 < num_new_channels <= num_channels:
                raise ValueError(f"the POD schedule sqrt(C_t / N) needs 0 < N <= C_t; got C_t={num_channels}, "
                                 f"N={num_new_channels} (turn it off with --no_pod_schedule)")
            loss = loss * math.sqrt(num_channels / num_new_channels)
        if layer.use_adaptative_factor:
            if labels is None:
                raise ValueError("POD's adaptive factor (use_adaptative_factor) needs the labels")
            loss = loss * (labels == 0).to(loss.dtype).mean()
        layer_losses.append(loss)
    if not layer_losses:
        dtype = torch.promote_types(new_maps[-1].dtype, torch.float32)
        return torch.zeros((), dtype=dtype, device=new_maps[-1].device)
    return sum(layer_losses) / len(new_maps)
