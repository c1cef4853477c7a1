"""The incremental segmentation dataset: one (task, step, split) view of VOC, ADE20K or synthetic data."""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..tasks import channel_order as task_channel_order
from ..tasks import num_steps
from .protocol import apply_lut, label_lut, shuffled_80_20_part
from .readers import (
    DATASET_DIRS,
    DatasetError,
    check_dataset_name,
    check_split_name,
    files_of,
    invalid_label_message,
    read_base_list,
    read_image,
    read_label,
)
from .splits import load_split_indices, on_main_process
from .synthetic import ensure_synthetic_voc

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]


def sample_generator(seed: int, epoch: int, base_index: int) -> torch.Generator:
    """A torch.Generator that depends only on (seed, epoch, base index of the sample)."""
    state = np.random.SeedSequence([seed, epoch, base_index]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return generator


def held_out_split(size: int, seed: int, fraction: float = 0.2) -> Tuple[List[int], List[int]]:
    """Random (train, held-out) positions of ``size`` items, the held-out part ``fraction`` of them
    (``--cross_val``: the reference's 80/20 ``random_split``). Depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(size, generator=generator).tolist()
    kept = int((1.0 - fraction) * size)
    return sorted(order[:kept]), sorted(order[kept:])


class IncrementalSegmentationDataset(Dataset):
    """Images of one split at one incremental step, with labels mapped to channel indices.

    ``dataset[i]`` is ``(image uint8 (3, H, W), label int64 (H, W))`` at native size, or
    ``transform(image, label, generator)`` when a transform is given. The generator is seeded
    from (seed, epoch, base index), so augmentation is the same whatever the number of
    DataLoader workers or processes.

    ``set_epoch`` must be called *before* the epoch's DataLoader iterator is created: each
    worker gets a copy of the dataset when the iterator starts (``persistent_workers=False``)
    and reads ``epoch`` from that copy.
    """

    def __init__(
        self,
        dataset: str,
        image_paths: List[str],
        label_paths: List[str],
        base_indices: np.ndarray,
        lut: np.ndarray,
        channel_order: List[int],
        transform: Optional[Transform] = None,
        seed: int = 0,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.image_paths = image_paths
        self.label_paths = label_paths
        self.base_indices = np.asarray(base_indices, dtype=np.int64)
        self.lut = lut
        self.channel_order = list(channel_order)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation; call before creating the DataLoader iterator."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_paths)

    def subset(self, positions: Sequence[int], transform: Optional[Transform]) -> "IncrementalSegmentationDataset":
        """The items at ``positions`` (indices into this dataset) with another transform."""
        return IncrementalSegmentationDataset(
            self.dataset,
            [self.image_paths[i] for i in positions],
            [self.label_paths[i] for i in positions],
            self.base_indices[list(positions)],
            self.lut,
            self.channel_order,
            transform,
            self.seed,
        )

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image and mapped label of item ``index``, without the transform."""
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image = read_image(image_path)
        label = read_label(label_path)
        if tuple(image.shape[1:]) != label.shape:
            raise DatasetError(
                f"image {image_path!r} is {image.shape[2]}x{image.shape[1]} but its label "
                f"{label_path!r} is {label.shape[1]}x{label.shape[0]}"
            )
        mapped, invalid = apply_lut(self.lut, label)
        if invalid.size:
            raise DatasetError(invalid_label_message(self.dataset, label_path, invalid))
        return image, torch.from_numpy(mapped)

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is None:
            return image, label
        generator = sample_generator(self.seed, self.epoch, int(self.base_indices[index]))
        return self.transform(image, label, generator)


def build_dataset(
    name: str,
    root: str,
    task: str,
    step: int,
    split: str,
    overlap: bool = False,
    transform: Optional[Transform] = None,
    *,
    seed: int = 0,
    split_dir: Optional[str] = None,
    mask_old: bool = True,
    images_from: Optional[str] = None,
    protocol: str = "mib",
    data_masking: str = "current",
    ignore_test_bg: bool = False,
    test_on_val: bool = False,
) -> IncrementalSegmentationDataset:
    """The images of ``split`` ("train", "val", "test") at ``step`` of ``task``.

    ``root`` is the folder that contains ``PascalVOC12/``, ``ADEChallengeData2016/`` or (for
    ``name="synthetic"``, generated here on first use) ``SyntheticVOC/``. Image selection and
    label mapping follow ``protocol.py``; split files are cached as described in ``splits.py``.
    ``overlap`` only affects the train split. ``mask_old=False`` keeps old classes in the
    training and validation labels (``--no_mask``); ``protocol`` ("mib" or "plop"), ``data_masking``
    and ``ignore_test_bg`` choose the rest of the label mapping (``protocol.label_lut``).
    ``images_from="train"`` draws the test split from the training images (``--val_on_trainset``; its
    index files are named ``test_on_train-<step>``). ``test_on_val`` (PLOP's option) keeps part of the
    train and test images (``protocol.shuffled_80_20_part``): the first 80 % of those drawn from the
    train list, the last 20 % of those drawn from the val list.

    In a distributed run every rank calls this; rank 0 prepares split files (and the synthetic
    data) and broadcasts them, so with NCCL the CUDA device must be set before. Call
    ``dataset.set_epoch(epoch)`` before creating each epoch's DataLoader iterator.
    """
    check_dataset_name(name)
    check_split_name(split)
    if not 0 <= step < num_steps(name, task):  # also validates the task name
        raise ValueError(
            f"step {step} does not exist in task {task!r}; valid steps: 0..{num_steps(name, task) - 1}"
        )
    if name == "synthetic":  # written under root (created if needed) on first use
        on_main_process(lambda: ensure_synthetic_voc(root))
    base = read_base_list(name, root, images_from or split)
    indices = load_split_indices(base, root, task, step, split, overlap, split_dir)
    if test_on_val and split != "val":
        indices = shuffled_80_20_part(indices, first=(images_from or split) == "train")
    if indices.size == 0:
        raise DatasetError(
            f"no image of {base.source} belongs to {split} step {step} of {name} task {task!r} "
            f"(overlap={overlap}{', test_on_val' if test_on_val else ''}) in "
            f"{os.path.join(root, DATASET_DIRS[name])}"
        )
    images, labels = files_of(base, indices)
    return IncrementalSegmentationDataset(
        name,
        images,
        labels,
        indices,
        label_lut(name, task, step, split, mask_old=mask_old, protocol=protocol, data_masking=data_masking,
                  ignore_test_bg=ignore_test_bg),
        task_channel_order(name, task, step),
        transform,
        seed,
    )
