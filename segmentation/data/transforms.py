"""Joint image/label transforms of the original training recipe, driven by an explicit torch.Generator.

A transform is called as ``transform(image, label, generator)`` with a uint8 image (3, H, W), an
int64 label (H, W) and the sample's generator; it returns a normalised float32 image (3, h, w)
and an int64 label (h, w) with the same geometry applied to both.

- Train: RandomResizedCrop(crop_size, scale 0.5-2.0 of the image area, ratio 3/4-4/3; up to 10
  draws of a crop that fits in the image, else the whole image centre-cropped to the ratio
  bounds), horizontal flip with p=0.5, ImageNet normalisation.
- Val/test: shorter side resized to crop_size, then a centre crop_size x crop_size crop; or
  (``full_image=True``) the image unchanged (evaluate with batch size 1).

Images are resized bilinearly with antialiasing (as PIL, which the reference used). Labels use
nearest-neighbour with pixel-centre sampling ("nearest-exact", which is PIL's NEAREST): plain
"nearest" samples pixel corners and shifts the label by up to half a source pixel against the
image. The random parameters are drawn from the given generator, never from the global RNG.

The kernels are plain torch operations, the same ones torchvision's ``transforms.v2`` tensor
kernels run on CPUs with AVX2 or on ARM (a test checks that both give bitwise the same output;
elsewhere torchvision resizes uint8 images in float32 instead): importing torchvision costs
every process about 4 s on a small CPU (its ``ops`` import ``torch._dynamo``), paid again by every
rank of every launch.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as nnf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.5, 2.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


def random_resized_crop_params(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: Sequence[float] = CROP_SCALE,
    ratio: Sequence[float] = CROP_RATIO,
) -> Tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a torchvision-style RandomResizedCrop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator).item())
            return top, left, crop_h, crop_w
    # Fallback: the whole image, centre-cropped to the ratio bounds.
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with antialiasing of a uint8 (3, H, W) image, computed in uint8."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return nnf.interpolate(image[None], size=list(size), mode="bilinear", align_corners=False, antialias=True)[0]


def _resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return nnf.interpolate(label[None, None], size=list(size), mode="nearest-exact")[0, 0]


def _shorter_side_to(height: int, width: int, short: int) -> Tuple[int, int]:
    """(height, width) with the shorter side ``short`` and the longer one scaled and truncated."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _center_crop(tensor: torch.Tensor, size: int) -> torch.Tensor:
    height, width = tensor.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return tensor[..., top:top + size, left:left + size]


def _normalize(image: torch.Tensor) -> torch.Tensor:
    image = image.to(torch.float32).mul_(1.0 / 255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return image.sub(mean).div_(std)


class TrainTransform:
    """RandomResizedCrop + horizontal flip + normalisation (picklable for DataLoader workers)."""

    def __init__(self, crop_size: int) -> None:
        self.crop_size = int(crop_size)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        top, left, crop_h, crop_w = random_resized_crop_params(height, width, generator)
        flip = torch.rand(1, generator=generator).item() < 0.5
        size = (self.crop_size, self.crop_size)
        # Label values are < 256 after mapping: uint8 keeps the geometric ops cheap.
        label = label.to(torch.uint8)
        image = _resize_image(image[:, top:top + crop_h, left:left + crop_w], size)
        label = _resize_label(label[top:top + crop_h, left:left + crop_w], size)
        if flip:
            image, label = image.flip(-1), label.flip(-1)
        return _normalize(image), label.long()

    def __repr__(self) -> str:
        return f"TrainTransform(crop_size={self.crop_size})"


class EvalTransform:
    """Shorter side to crop_size + centre crop (or the full image) + normalisation."""

    def __init__(self, crop_size: int, full_image: bool = False) -> None:
        self.crop_size = int(crop_size)
        self.full_image = bool(full_image)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        label = label.to(torch.uint8)
        if not self.full_image:
            size = _shorter_side_to(image.shape[-2], image.shape[-1], self.crop_size)
            image, label = _resize_image(image, size), _resize_label(label, size)
            image, label = _center_crop(image, self.crop_size), _center_crop(label, self.crop_size)
        return _normalize(image), label.long()

    def __repr__(self) -> str:
        return f"EvalTransform(crop_size={self.crop_size}, full_image={self.full_image})"


def train_transform(crop_size: int) -> TrainTransform:
    """The reference's training augmentation at ``crop_size``."""
    return TrainTransform(crop_size)


def eval_transform(crop_size: int, full_image: bool = False) -> EvalTransform:
    """The reference's val/test preprocessing: resize + centre crop, or the full image."""
    return EvalTransform(crop_size, full_image)
