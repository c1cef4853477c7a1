"""Incremental segmentation model: shared body and head, one 1x1 classifier per learning step."""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class IncrementalSegmenter(nn.Module):
    """``body -> head -> [cls[0], ..., cls[t]] -> concat -> bilinear upsample``.

    ``classes[s]`` is the number of output channels added at step ``s`` (step 0 includes the
    background), so output channel ``k`` follows the step order of the classes.
    """

    def __init__(self, body: nn.Module, head: nn.Module, classes: list[int]) -> None:
        super().__init__()
        if not classes or any(int(n) < 1 for n in classes):
            raise ValueError(f"classes must be a non-empty list of positive class counts per step, got {classes!r}")
        self.body = body
        self.head = head
        self.classes = [int(n) for n in classes]
        self.cls = nn.ModuleList(nn.Conv2d(head.out_channels, n, 1, bias=True) for n in self.classes)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Logits at the input resolution; with ``return_features`` also ``{"body", "pre_logits"}``."""
        body_out = self.body(x)
        head_out = self.head(body_out)
        logits = torch.cat([classifier(head_out) for classifier in self.cls], dim=1)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if return_features:
            return logits, {"body": body_out, "pre_logits": head_out}
        return logits

    @torch.no_grad()
    def init_new_classifier(self) -> None:
        """MiB initialisation of the last step's classifier from the background classifier.

        With ``N`` new classes, every new channel gets the background weight and the bias
        ``b_bg - log(N + 1)``, and the background bias becomes ``b_bg - log(N + 1)`` too, so that
        the old background probability is split equally over background and the new classes.
        """
        if len(self.cls) < 2:
            raise RuntimeError(
                "init_new_classifier needs a model of step >= 1; this model has only the step-0 classifier"
            )
        background, new = self.cls[0], self.cls[-1]
        bias = background.bias[0] - math.log(new.out_channels + 1)
        new.weight.copy_(background.weight[0:1].expand_as(new.weight))
        new.bias.copy_(bias.expand_as(new.bias))
        background.bias[0] = bias

    def fix_bn(self) -> None:
        """Put every norm layer in eval mode and freeze its affine parameters.

        ``train()`` switches the layers back to training mode, so call this after every
        ``model.train()``; the frozen parameters stay frozen.
        """
        for module in self.modules():
            # Every norm+activation layer of norm.py is a BatchNorm2d.
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)
