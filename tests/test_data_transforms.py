"""Joint transforms: parameters, alignment of image and label, determinism across workers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from segmentation.data import build_dataset, sample_generator
from segmentation.data.synthetic import generate_synthetic_voc
from segmentation.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    random_resized_crop_params,
    train_transform,
)

SIZES = [(375, 500), (333, 500), (500, 500), (96, 128), (40, 300), (300, 40)]


def _denormalize(image):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean) * 255.0


def test_crop_params_match_torchvision():
    # torchvision draws from the global RNG; with equal seeds the draws must agree.
    for seed in range(60):
        height, width = SIZES[seed % len(SIZES)]
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.5, 2.0], [3 / 4, 4 / 3])
        generator = torch.Generator().manual_seed(seed)
        assert random_resized_crop_params(height, width, generator) == tuple(expected)


@pytest.mark.parametrize(
    "height, width, expected",
    [(40, 300, (0, 123, 40, 53)), (300, 40, (123, 0, 53, 40)), (90, 100, (0, 0, 90, 100))],
)
def test_crop_fallback(height, width, expected):
    # Areas far above the image's never fit: whole image, centre-cropped to the ratio bounds.
    generator = torch.Generator().manual_seed(0)
    assert random_resized_crop_params(height, width, generator, scale=(50.0, 60.0)) == expected


def _coded_sample(height=37, width=53, seed=0):
    """A blocky label and an image whose grey level encodes the label (value * 10)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 21, size=(height // 4 + 1, width // 4 + 1))
    label = np.kron(blocks, np.ones((4, 4), dtype=np.int64))[:height, :width]
    image = np.repeat((label * 10).astype(np.uint8)[None], 3, axis=0)
    return torch.from_numpy(image), torch.from_numpy(label)


def test_train_transform_is_pil_crop_resize_flip():
    image, label = _coded_sample()
    transform = train_transform(32)
    for seed in range(10):
        out_image, out_label = transform(image, label, torch.Generator().manual_seed(seed))
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        assert out_label.shape == (32, 32) and out_label.dtype == torch.int64
        # Slow reference: the same parameters applied with PIL, as in the reference code.
        generator = torch.Generator().manual_seed(seed)
        top, left, h, w = random_resized_crop_params(37, 53, generator)
        flip = torch.rand(1, generator=generator).item() < 0.5
        box = (left, top, left + w, top + h)
        pil_label = Image.fromarray(label.numpy().astype(np.uint8)).crop(box).resize((32, 32), Image.NEAREST)
        pil_image = Image.fromarray(image[0].numpy()).crop(box).resize((32, 32), Image.BILINEAR)
        if flip:
            pil_label = pil_label.transpose(Image.FLIP_LEFT_RIGHT)
            pil_image = pil_image.transpose(Image.FLIP_LEFT_RIGHT)
        assert np.array_equal(out_label.numpy(), np.array(pil_label))
        restored = _denormalize(out_image)
        assert torch.allclose(restored[0], torch.from_numpy(np.array(pil_image)).float(), atol=1.01)
        # Alignment: where the label is constant in a neighbourhood, the pixel encodes it.
        as_float = out_label[None].float()
        largest = torch.nn.functional.max_pool2d(as_float, 3, 1, 1)[0]
        smallest = -torch.nn.functional.max_pool2d(-as_float, 3, 1, 1)[0]
        interior = largest == smallest
        assert interior.sum() > 50
        assert torch.allclose(
            restored[:, interior], (out_label[interior] * 10).float().expand(3, -1), atol=1.01
        )


def test_eval_transform_resize_and_centre_crop():
    image, label = _coded_sample(37, 53)
    out_image, out_label = eval_transform(24)(image, label, torch.Generator())
    assert out_image.shape == (3, 24, 24) and out_label.shape == (24, 24)
    resized = Image.fromarray(label.numpy().astype(np.uint8)).resize(
        (34, 24), Image.NEAREST
    )  # 53*24/37 = 34.4
    expected = np.array(resized)[:, 5:29]  # centre crop: left = round((34 - 24) / 2)
    assert np.array_equal(out_label.numpy(), expected)
    pil_image = np.array(Image.fromarray(image[0].numpy()).resize((34, 24), Image.BILINEAR))[:, 5:29]
    assert torch.allclose(_denormalize(out_image)[0], torch.from_numpy(pil_image).float(), atol=1.01)

    full_image, full_label = eval_transform(24, full_image=True)(image, label, torch.Generator())
    assert torch.equal(full_label, label)
    assert torch.allclose(_denormalize(full_image), image.float(), atol=1e-3)


def _torchvision_train(image, label, crop_size, generator):
    """The training transform written with torchvision's transforms.v2 kernels."""
    top, left, crop_h, crop_w = random_resized_crop_params(*image.shape[-2:], generator)
    flip = torch.rand(1, generator=generator).item() < 0.5
    size = [crop_size, crop_size]
    image, label = tv_tensors.Image(image), tv_tensors.Mask(label.to(torch.uint8))
    image = F.resized_crop(image, top, left, crop_h, crop_w, size, interpolation=InterpolationMode.BILINEAR,
                           antialias=True)
    label = F.resize_image(F.crop(label, top, left, crop_h, crop_w)[None], size,
                           interpolation=InterpolationMode.NEAREST_EXACT)[0]
    if flip:
        image, label = F.horizontal_flip(image), F.horizontal_flip(label)
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD)), label


def _torchvision_eval(image, label, crop_size):
    image, label = tv_tensors.Image(image), tv_tensors.Mask(label.to(torch.uint8))
    image = F.resize(image, [crop_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    label = F.resize_image(label[None], list(image.shape[-2:]), interpolation=InterpolationMode.NEAREST_EXACT)[0]
    image, label = F.center_crop(image, [crop_size] * 2), F.center_crop(label, [crop_size] * 2)
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD)), label


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="torchvision resizes uint8 images in float32 on CPUs without AVX2")
@pytest.mark.parametrize("height, width", [(96, 128), (128, 96), (37, 53), (64, 64), (375, 500)])
def test_transforms_equal_torchvision_kernels_bitwise(height, width):
    rng = np.random.default_rng(height * width)
    image = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
    label = torch.from_numpy(rng.integers(0, 21, (height, width))).long()
    for seed in range(8):
        ours = train_transform(48)(image, label, torch.Generator().manual_seed(seed))
        theirs = _torchvision_train(image, label, 48, torch.Generator().manual_seed(seed))
        assert torch.equal(ours[0], theirs[0].as_subclass(torch.Tensor))
        assert torch.equal(ours[1], theirs[1].as_subclass(torch.Tensor).long())
    for crop_size in (32, 64):
        ours = eval_transform(crop_size)(image, label, torch.Generator())
        theirs = _torchvision_eval(image, label, crop_size)
        assert torch.equal(ours[0], theirs[0].as_subclass(torch.Tensor))
        assert torch.equal(ours[1], theirs[1].as_subclass(torch.Tensor).long())


def test_sample_generator_depends_on_seed_epoch_and_index():
    def draw(*key):
        return torch.rand(4, generator=sample_generator(*key))

    assert torch.equal(draw(0, 1, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 2, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 1, 6))
    assert not torch.equal(draw(0, 1, 5), draw(1, 1, 5))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_voc(str(root / "SyntheticVOC"), num_train=60, num_val=20, width=48, height=32)
    return str(root)


def _epoch(dataset, epoch, workers):
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, shuffle=False)
    return [(image, label) for image, label in loader]


def test_same_crops_for_any_worker_count(synthetic_root):
    dataset = build_dataset(
        "synthetic", synthetic_root, "15-5", 0, "train", True, train_transform(24), seed=3
    )
    serial = _epoch(dataset, 1, 0)
    parallel = _epoch(dataset, 1, 2)
    assert len(serial) == len(parallel)
    for (image_a, label_a), (image_b, label_b) in zip(serial, parallel):
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
    other_epoch = _epoch(dataset, 2, 0)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(serial, other_epoch))


def test_same_sample_same_crop_in_another_split_view(synthetic_root):
    # Augmentation follows the base index: the disjoint and overlapped views agree on shared images.
    disjoint = build_dataset(
        "synthetic", synthetic_root, "15-5", 0, "train", False, train_transform(24), seed=3
    )
    overlapped = build_dataset(
        "synthetic", synthetic_root, "15-5", 0, "train", True, train_transform(24), seed=3
    )
    shared = int(disjoint.base_indices[1])
    image_a, _ = disjoint[1]
    image_b, _ = overlapped[overlapped.base_indices.tolist().index(shared)]
    assert torch.equal(image_a, image_b)


def test_training_code_does_not_import_torchvision():
    # Its import (which pulls in torch._dynamo) would cost every process of every launch seconds.
    code = ("import sys, segmentation.engine.run, train; "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "[]", done.stdout
