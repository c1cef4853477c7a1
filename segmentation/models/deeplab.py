"""DeepLabV3 head: ASPP with image pooling, as used by MiB."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import LEAKY_RELU_SLOPE

# Dilation rates of the three 3x3 ASPP convs. At output stride 8 the reference uses 32, not 36.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 32)}


class DeepLabV3Head(nn.Module):
    """ASPP (one 1x1 and three atrous 3x3 convs) plus an image-pooling branch.

    ``out = red_bn(red_conv(map_bn(cat(branches))) + pool_red_conv(global_pooling_bn(global_pooling_conv(pool(x)))))``

    Pooling is global in training and when ``pooling_size`` is None. In eval mode it is an
    average over a ``(min(pooling_size, H), min(pooling_size, W))`` window with stride 1, padded
    back to ``H x W`` by replication.
    """

    def __init__(
        self,
        in_channels: int,
        norm_act: Callable[..., nn.Module],
        output_stride: int = 16,
        out_channels: int = 256,
        hidden_channels: int = 256,
        pooling_size: Optional[int] = 32,
    ) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"unknown output_stride {output_stride!r}; valid: {', '.join(map(str, ASPP_RATES))}")
        if pooling_size is not None and pooling_size < 1:
            raise ValueError(f"pooling_size must be a positive integer or None, got {pooling_size!r}")
        self.out_channels = out_channels
        self.pooling_size = pooling_size

        def norm(channels: int) -> nn.Module:
            return norm_act(channels, activation="leaky_relu", activation_param=LEAKY_RELU_SLOPE)

        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [
                nn.Conv2d(in_channels, hidden_channels, 3, padding=rate, dilation=rate, bias=False)
                for rate in ASPP_RATES[output_stride]
            ]
        )
        self.map_bn = norm(4 * hidden_channels)
        self.red_conv = nn.Conv2d(4 * hidden_channels, out_channels, 1, bias=False)

        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm(hidden_channels)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)

        self.red_bn = norm(out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        gain = nn.init.calculate_gain("leaky_relu", LEAKY_RELU_SLOPE)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.pooling_size is None:
            return x.mean(dim=(2, 3), keepdim=True)
        height, width = x.shape[2:]
        window = (min(self.pooling_size, height), min(self.pooling_size, width))
        pooled = F.avg_pool2d(x, window, stride=1)
        # (left, right, top, bottom) so that the map is H x W again.
        pad_w, pad_h = window[1] - 1, window[0] - 1
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        return F.pad(pooled, padding, mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self.map_bn(out))
        pool = self.global_pooling_bn(self.global_pooling_conv(self._pool(x)))
        pool = self.pool_red_conv(pool)
        return self.red_bn(out + pool)
