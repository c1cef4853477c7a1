"""Joint image/label transforms of the reference (§5.2), driven by an explicit torch.Generator.

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
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

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


def _resize_label(label: tv_tensors.Mask, size: List[int]) -> tv_tensors.Mask:
    # The image kernel with NEAREST_EXACT: torchvision's mask kernels force corner-sampling
    # NEAREST in some versions.
    resized = F.resize_image(
        label.as_subclass(torch.Tensor)[None], size, interpolation=InterpolationMode.NEAREST_EXACT
    )
    return tv_tensors.Mask(resized[0])


def _normalize(image: tv_tensors.Image) -> torch.Tensor:
    image = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(image, list(IMAGENET_MEAN), list(IMAGENET_STD)).as_subclass(torch.Tensor)


def _wrap(image: torch.Tensor, label: torch.Tensor) -> Tuple[tv_tensors.Image, tv_tensors.Mask]:
    # Label values are < 256 after mapping: uint8 keeps the geometric ops cheap.
    return tv_tensors.Image(image), tv_tensors.Mask(label.to(torch.uint8))


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
        size = [self.crop_size, self.crop_size]
        image, label = _wrap(image, label)
        image = F.resized_crop(
            image, top, left, crop_h, crop_w, size, interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        label = _resize_label(F.crop(label, top, left, crop_h, crop_w), size)
        if flip:
            image, label = F.horizontal_flip(image), F.horizontal_flip(label)
        return _normalize(image), label.as_subclass(torch.Tensor).long()

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
        image, label = _wrap(image, label)
        if not self.full_image:
            image = F.resize(
                image, [self.crop_size], interpolation=InterpolationMode.BILINEAR, antialias=True
            )
            label = _resize_label(label, list(image.shape[-2:]))
            size = [self.crop_size, self.crop_size]
            image, label = F.center_crop(image, size), F.center_crop(label, size)
        return _normalize(image), label.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"EvalTransform(crop_size={self.crop_size}, full_image={self.full_image})"


def train_transform(crop_size: int) -> TrainTransform:
    """The reference's training augmentation at ``crop_size``."""
    return TrainTransform(crop_size)


def eval_transform(crop_size: int, full_image: bool = False) -> EvalTransform:
    """The reference's val/test preprocessing: resize + centre crop, or the full image."""
    return EvalTransform(crop_size, full_image)
