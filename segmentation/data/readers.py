"""Raw dataset readers: the ordered image/label file lists of VOC, ADE20K and the synthetic set.

The position of a file in these lists is the *base index* used by split files, so the order
is the reference's: the line order of ``splits/train_aug.txt`` / ``splits/val.txt`` for VOC
(and the synthetic set, which has the VOC layout), and ``sorted(os.listdir(...))`` of the
image folder for ADE20K.

Every problem a user can hit with the files is reported as ``FileNotFoundError`` (a folder,
list, image or label that does not exist) or :class:`DatasetError` (anything wrong with the
content), always naming the file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..tasks import NUM_LABELS

DATASET_NAMES = ("voc", "ade", "synthetic")
SPLIT_NAMES = ("train", "val", "test")
VOID_LABEL = 255

# Folder of each dataset under --data_root.
DATASET_DIRS = {"voc": "PascalVOC12", "ade": "ADEChallengeData2016", "synthetic": "SyntheticVOC"}


class DatasetError(ValueError):
    """A dataset file exists but its content is wrong (corrupt, inconsistent, invalid labels)."""


def label_family(dataset: str) -> str:
    """``"voc"`` or ``"ade"``: which label conventions (void 255, label 0) a dataset follows."""
    check_dataset_name(dataset)
    return "ade" if dataset == "ade" else "voc"


def check_dataset_name(dataset: str) -> None:
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASET_NAMES)}")


def check_split_name(split: str) -> None:
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_NAMES)}")


def dataset_dir(dataset: str, root: str) -> str:
    """Folder of ``dataset`` under the data root, e.g. ``<root>/PascalVOC12``."""
    check_dataset_name(dataset)
    return os.path.join(root, DATASET_DIRS[dataset])


def valid_label_table(dataset: str) -> np.ndarray:
    """Boolean table over the 256 uint8 values: which values may appear in a label file.

    VOC (and synthetic): classes 0..20 and the void/boundary value 255. ADE20K: 0..150.
    """
    valid = np.zeros(256, dtype=bool)
    valid[: NUM_LABELS[dataset]] = True
    if label_family(dataset) == "voc":
        valid[VOID_LABEL] = True
    return valid


@dataclass(frozen=True)
class BaseList:
    """The ordered files of one raw list (VOC ``train_aug``/``val``, ADE ``training``/``validation``)."""

    dataset: str
    directory: str  # the dataset folder, e.g. <root>/PascalVOC12
    name: str  # list name: "train_aug", "val", "training" or "validation"
    source: str  # the list file (VOC) or image folder (ADE) the order comes from
    images: Tuple[str, ...]
    labels: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def digest(self) -> str:
        """SHA-1 of the file list (paths relative to the dataset folder, in order)."""
        sha = hashlib.sha1()
        start = len(os.path.join(self.directory, ""))
        for image, label in zip(self.images, self.labels):
            sha.update(f"{image[start:]}\0{label[start:]}\n".encode())
        return sha.hexdigest()


def list_name_for_split(dataset: str, split: str) -> str:
    """Raw list behind a split: train uses the training list, val and test the validation list."""
    check_split_name(split)
    if label_family(dataset) == "ade":
        return "training" if split == "train" else "validation"
    return "train_aug" if split == "train" else "val"


def read_base_list(dataset: str, root: str, split: str) -> BaseList:
    """Read the ordered image/label file list of ``split`` ("train", "val" or "test")."""
    directory = dataset_dir(dataset, root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root!r} does not exist (--data_root)")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"dataset folder {directory!r} does not exist: --data_root must contain "
            f"{DATASET_DIRS[dataset]}/"
        )
    name = list_name_for_split(dataset, split)
    if label_family(dataset) == "ade":
        return _read_ade_list(dataset, directory, name)
    return _read_voc_list(dataset, directory, name)


def _read_voc_list(dataset: str, directory: str, name: str) -> BaseList:
    list_file = os.path.join(directory, "splits", f"{name}.txt")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list file {list_file!r} does not exist")
    images, labels = [], []
    with open(list_file) as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetError(
                    f"{list_file}, line {number}: expected '/image_path /label_path', got {line.strip()!r}"
                )
            # Paths start with '/' and are relative to the dataset folder.
            images.append(os.path.join(directory, fields[0].lstrip("/")))
            labels.append(os.path.join(directory, fields[1].lstrip("/")))
    if not images:
        raise DatasetError(f"list file {list_file!r} lists no images")
    return BaseList(dataset, directory, name, list_file, tuple(images), tuple(labels))


def _read_ade_list(dataset: str, directory: str, name: str) -> BaseList:
    image_dir = os.path.join(directory, "images", name)
    label_dir = os.path.join(directory, "annotations", name)
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"ADE20K folder {folder!r} does not exist")
    names = sorted(entry.name for entry in os.scandir(image_dir) if entry.is_file())
    if not names:
        raise DatasetError(f"ADE20K image folder {image_dir!r} is empty")
    images = tuple(os.path.join(image_dir, file) for file in names)
    labels = tuple(os.path.join(label_dir, os.path.splitext(file)[0] + ".png") for file in names)
    return BaseList(dataset, directory, name, image_dir, images, labels)


def read_image(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor of shape (3, H, W) (with PIL, like the reference)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"image {path!r} cannot be decoded (corrupt or not an image): {error}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image file, read from its header only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"image {path!r} cannot be read (corrupt or not an image): {error}") from None
    return height, width


def read_label(path: str) -> np.ndarray:
    """Read a label file (single-channel or palette PNG) to a uint8 array of shape (H, W)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label {path!r} does not exist")
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise DatasetError(
                    f"label {path!r} has image mode {image.mode!r}; expected a single-channel "
                    "('L') or palette ('P') PNG whose values are class ids"
                )
            return np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(f"label {path!r} cannot be read (corrupt or not an image): {error}") from None


def invalid_label_message(dataset: str, path: str, values: np.ndarray) -> str:
    valid = "0..20 and 255 (void)" if label_family(dataset) == "voc" else "0..150"
    shown = ", ".join(str(int(v)) for v in values[:10])
    return f"label {path!r} contains values that are not {dataset} classes: {shown} (valid: {valid})"


def labels_present(image_path: str, label_path: str, dataset: str) -> np.ndarray:
    """Which of the 256 label values occur in a label file (bool array of 256).

    Also checks that the image exists and has the label's size and that every value is a class
    of the dataset. Runs in split-computation worker processes, so it raises only picklable
    errors with a message that names the file.
    """
    label = read_label(label_path)
    height, width = image_size(image_path)
    if label.shape != (height, width):
        raise DatasetError(
            f"image {image_path!r} is {width}x{height} but its label {label_path!r} is "
            f"{label.shape[1]}x{label.shape[0]}"
        )
    present = np.bincount(label.ravel(), minlength=256) > 0
    invalid = present & ~valid_label_table(dataset)
    if invalid.any():
        raise DatasetError(invalid_label_message(dataset, label_path, np.flatnonzero(invalid)))
    return present


def files_of(base: BaseList, indices: np.ndarray) -> Tuple[List[str], List[str]]:
    """Image and label paths at the given base indices."""
    return [base.images[i] for i in indices], [base.labels[i] for i in indices]
