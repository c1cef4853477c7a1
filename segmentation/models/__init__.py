"""Segmentation models: dilated ResNet body, DeepLabV3 head, incremental classifiers."""
from __future__ import annotations

import os
from typing import Optional, Union

from .deeplab import ASPP_RATES, DeepLabV3Head
from .norm import norm_act_layer
from .pretrained import cached_torchvision_weights, fetch_torchvision_weights, load_imagenet_weights
from .resnet import RESNET_LAYOUTS, ResNet
from .segmenter import IncrementalSegmenter

__all__ = ["DeepLabV3Head", "IncrementalSegmenter", "ResNet", "build_model", "cached_torchvision_weights",
           "fetch_torchvision_weights", "load_imagenet_weights"]


def build_model(
    classes: list[int],
    backbone: str = "resnet101",
    output_stride: int = 16,
    norm_act: str = "iabn_sync",
    pretrained: Union[None, str, os.PathLike] = None,
    pooling_size: Optional[int] = 32,
) -> IncrementalSegmenter:
    """DeepLabV3 on a dilated ResNet with one classifier per step (``classes[s]`` channels at step ``s``).

    ``pretrained``: None (random body), a path to ImageNet weights (In-Place ABN checkpoint or
    torchvision state dict, see ``load_imagenet_weights``), or "torchvision" for torchvision's
    ImageNet weights of ``backbone``, read from torch hub's cache without any download (every rank
    builds its model; ``fetch_torchvision_weights`` downloads them once, before).
    """
    if backbone not in RESNET_LAYOUTS:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(RESNET_LAYOUTS)}")
    if output_stride not in ASPP_RATES:
        raise ValueError(f"unknown output_stride {output_stride!r}; valid: {', '.join(map(str, ASPP_RATES))}")
    norm_layer = norm_act_layer(norm_act)

    body = ResNet(backbone, norm_layer, output_stride)
    if pretrained == "torchvision":
        load_imagenet_weights(body, cached_torchvision_weights(backbone))
    elif pretrained is not None:
        load_imagenet_weights(body, pretrained)
    head = DeepLabV3Head(body.out_channels, norm_layer, output_stride, pooling_size=pooling_size)
    return IncrementalSegmenter(body, head, classes)
