"""Colour palette for visualising label maps (the Pascal VOC palette, used for every dataset)."""

from __future__ import annotations

import numpy as np
import torch


def color_palette(num_colors: int = 256) -> np.ndarray:
    """The Pascal VOC colour palette: (num_colors, 3) uint8, label value -> RGB.

    Colour k spreads the bits of k over the high bits of R, G and B, so neighbouring labels get
    very different colours; value 255 (void) is light beige.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def colorize(label: torch.Tensor) -> torch.Tensor:
    """Label map (H, W) with values 0..255 -> uint8 RGB image (3, H, W) in the VOC palette."""
    palette = torch.from_numpy(color_palette(256))
    return palette[label.long().clamp(0, 255).cpu()].permute(2, 0, 1).contiguous()
