"""Dilated ResNet body with the block layout and parameter names of the In-Place ABN ImageNet models.

Layout (state-dict names in brackets)::

    mod1  [conv1 7x7/2, bn1 norm+act, pool1 3x3/2 max-pool]
    mod2 .. mod5  [block1 .. blockN]
        block  [convs (conv1, bn1, conv2, bn2[, conv3, bn3]), proj_conv, proj_bn]

The 3x3 conv of a block carries its stride and dilation ("ResNet v1.5"). ``proj_bn`` has the
identity activation; the last norm of ``convs`` is called with the shortcut as its residual and
computes ``leaky_relu(BN(conv) + shortcut)`` in one layer, so that In-Place ABN keeps only the
block's output for backward. Norm+activation layers are In-Place-safe: each is fed a fresh conv
output.

Feature taps (PLOP's distillation): ``ResNet.forward(x, stage_features=True)`` also returns the
pre-activation ``z = BN(conv) + shortcut`` of the last block of mod2..mod5. Only those four blocks
then compute ``z`` with the last norm's activation skipped (``activate=False``) and apply the leaky
ReLU out of place, so In-Place ABN never overwrites ``z`` and autograd keeps it; their output equals
the untapped block's bit for bit (float32, float64).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Union

import torch
import torch.nn as nn

from .norm import apply_activation

LEAKY_RELU_SLOPE = 0.01

NormAct = Callable[..., nn.Module]

# name -> (bottleneck?, blocks per module mod2..mod5)
RESNET_LAYOUTS = {
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
    "resnet152": (True, (3, 8, 36, 3)),
}

# Dilation of mod2..mod5 for each supported output stride (no multi-grid).
DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}


def _norm(norm_act: NormAct, channels: int, activation: str = "leaky_relu") -> nn.Module:
    return norm_act(channels, activation=activation, activation_param=LEAKY_RELU_SLOPE)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    padding = dilation * (kernel - 1) // 2
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)


class ResidualBlock(nn.Module):
    """Basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block.

    ``channels`` gives the output width of each conv: two entries for a basic block,
    three for a bottleneck.
    """

    def __init__(
        self, in_channels: int, channels: tuple[int, ...], norm_act: NormAct, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        if len(channels) == 2:
            layers = [
                ("conv1", _conv(in_channels, channels[0], 3, stride, dilation)),
                ("bn1", _norm(norm_act, channels[0])),
                ("conv2", _conv(channels[0], channels[1], 3, 1, dilation)),
                ("bn2", _norm(norm_act, channels[1])),
            ]
        elif len(channels) == 3:
            layers = [
                ("conv1", _conv(in_channels, channels[0], 1)),
                ("bn1", _norm(norm_act, channels[0])),
                ("conv2", _conv(channels[0], channels[1], 3, stride, dilation)),
                ("bn2", _norm(norm_act, channels[1])),
                ("conv3", _conv(channels[1], channels[2], 1)),
                ("bn3", _norm(norm_act, channels[2])),
            ]
        else:
            raise ValueError(f"a residual block has 2 or 3 convs, got channels={channels}")
        self.convs = nn.Sequential(OrderedDict(layers))
        out_channels = channels[-1]
        if stride != 1 or in_channels != out_channels:
            self.proj_conv = _conv(in_channels, out_channels, 1, stride)
            self.proj_bn = _norm(norm_act, out_channels, "identity")
        else:
            self.proj_conv = None
            self.proj_bn = None

    def forward(
        self, x: torch.Tensor, preactivation: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The block's output; with ``preactivation`` the pair (output, ``BN(conv) + shortcut``).

        With ``preactivation`` the activation runs out of place on the pre-activation sum, which
        stays intact (In-Place ABN overwrites only the conv output it is given).
        """
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        *layers, last_norm = self.convs
        out = x
        for layer in layers:
            out = layer(out)
        if not preactivation:
            return last_norm(out, residual=shortcut)
        summed = last_norm(out, residual=shortcut, activate=False)
        return apply_activation(summed, last_norm.activation, last_norm.activation_param), summed


class ResNet(nn.Module):
    """ResNet-18/34/50/101/152 body (no classifier) with output stride 16 or 8.

    Stride 2 goes on the first block of mod3..mod5 when that module is not dilated;
    every block of a dilated module uses the module's dilation.
    """

    def __init__(self, name: str, norm_act: NormAct, output_stride: int = 16) -> None:
        super().__init__()
        if name not in RESNET_LAYOUTS:
            raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(RESNET_LAYOUTS)}")
        if output_stride not in DILATIONS:
            raise ValueError(f"unknown output_stride {output_stride!r}; valid: {', '.join(map(str, DILATIONS))}")
        bottleneck, num_blocks = RESNET_LAYOUTS[name]
        self.output_stride = output_stride

        self.mod1 = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
                    ("bn1", _norm(norm_act, 64)),
                    ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
                ]
            )
        )
        in_channels = 64
        for index, (blocks, dilation) in enumerate(zip(num_blocks, DILATIONS[output_stride])):
            width = 64 * 2**index
            channels = (width, width, 4 * width) if bottleneck else (width, width)
            module = []
            for b in range(blocks):
                stride = 2 if b == 0 and index > 0 and dilation == 1 else 1
                module.append((f"block{b + 1}", ResidualBlock(in_channels, channels, norm_act, stride, dilation)))
                in_channels = channels[-1]
            setattr(self, f"mod{index + 2}", nn.Sequential(OrderedDict(module)))
        self.out_channels = in_channels

    def forward(
        self, x: torch.Tensor, stage_features: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
        """The body's output; with ``stage_features`` the pair (output, pre-activations of the last
        block of mod2, mod3, mod4, mod5)."""
        x = self.mod1(x)
        if not stage_features:
            x = self.mod2(x)
            x = self.mod3(x)
            x = self.mod4(x)
            return self.mod5(x)
        preactivations = []
        for module in (self.mod2, self.mod3, self.mod4, self.mod5):
            *blocks, last_block = module
            for block in blocks:
                x = block(x)
            x, summed = last_block(x, preactivation=True)
            preactivations.append(summed)
        return x, preactivations
