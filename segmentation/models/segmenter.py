"""Incremental segmentation model: shared body and head, one 1x1 classifier per learning step.

``model(x)`` returns the logits; ``model(x, features=names)`` also returns the intermediate maps
named in ``FEATURE_NAMES`` that a method distils:

- ``body``: the body's output;
- ``pre_logits``: the head's output (after its last norm and activation);
- ``stage2`` .. ``stage5``: the pre-activation (``BN(conv) + shortcut``) of the last block of
  ResNet mod2..mod5, computed only when one of them is requested (``ResNet.forward``);
- ``logits_small``: the concatenated classifier outputs at the head's resolution, before the
  bilinear upsampling.
"""
from __future__ import annotations

import math
from typing import Collection, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_NAMES = ("body", "pre_logits", "stage2", "stage3", "stage4", "stage5", "logits_small")
STAGE_FEATURE_NAMES = ("stage2", "stage3", "stage4", "stage5")


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
        self, x: torch.Tensor, features: Collection[str] = ()
    ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Logits at the input resolution; with ``features`` (names from ``FEATURE_NAMES``) the pair
        (logits, ``{name: map}`` holding exactly the requested maps)."""
        if isinstance(features, str):
            raise TypeError(f"features must be a collection of names, got the string {features!r}")
        unknown = set(features).difference(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; valid: {', '.join(FEATURE_NAMES)}")
        maps = {}
        if any(name in features for name in STAGE_FEATURE_NAMES):
            body_out, stages = self.body(x, stage_features=True)
            maps.update(zip(STAGE_FEATURE_NAMES, stages))
        else:
            body_out = self.body(x)
        head_out = self.head(body_out)
        logits_small = torch.cat([classifier(head_out) for classifier in self.cls], dim=1)
        logits = F.interpolate(logits_small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not features:
            return logits
        maps.update(body=body_out, pre_logits=head_out, logits_small=logits_small)
        return logits, {name: maps[name] for name in FEATURE_NAMES if name in features}

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
