"""The synthetic VOC-like dataset end to end, the tiny ADE writer, class names and palette."""

import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.data import CLASS_NAMES, build_dataset, color_palette, colorize
from segmentation.data import splits
from segmentation.data.protocol import filter_presence, split_filter
from segmentation.data.synthetic import MARKER, generate_synthetic_ade, generate_synthetic_voc
from segmentation.tasks import num_steps


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
    """A data root where build_dataset wrote SyntheticVOC with the default parameters."""
    root = str(tmp_path_factory.mktemp("data"))
    build_dataset("synthetic", root, "15-5", 0, "val")
    return root


def test_written_in_voc_layout_at_default_size(default_root):
    folder = os.path.join(default_root, "SyntheticVOC")
    for name, count in (("train_aug", 600), ("val", 150)):
        with open(os.path.join(folder, "splits", f"{name}.txt")) as handle:
            lines = handle.read().splitlines()
        assert len(lines) == count
        image_path, label_path = lines[0].split()
        assert image_path.startswith("/JPEGImages/") and label_path.startswith("/SegmentationClassAug/")
        label = Image.open(os.path.join(folder, label_path.lstrip("/")))
        assert label.mode == "P" and label.size == (128, 96)
        assert Image.open(os.path.join(folder, image_path.lstrip("/"))).format == "JPEG"


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_class_and_void_present(default_root, split):
    presence = splits.scan_presence(splits.read_base_list("synthetic", default_root, split))
    assert presence[:, 1:21].any(axis=0).all()
    assert presence[:, 255].all()  # void band around every object
    counts = presence[:, 1:21].sum(axis=1)
    assert counts.min() == 1 and counts.max() == 3


def test_every_voc_task_has_images_for_every_step(default_root):
    presence = {
        split: splits.scan_presence(splits.read_base_list("synthetic", default_root, split))
        for split in ("train", "val")
    }
    for task in ("15-5", "15-1", "19-1", "10-1", "5-3"):
        for step, overlap in itertools.product(range(num_steps("synthetic", task)), (False, True)):
            for split in ("train", "val", "test"):
                rule = split_filter("synthetic", task, step, split, overlap)
                kept = filter_presence(presence["train" if split == "train" else "val"], rule)
                assert kept.size >= 5, (task, step, split, overlap)
        # Old classes appear in later steps' images, more so when overlapped.
        last = num_steps("synthetic", task) - 1
        disjoint = filter_presence(
            presence["train"], split_filter("synthetic", task, last - 1, "train", False)
        )
        overlapped = filter_presence(
            presence["train"], split_filter("synthetic", task, last - 1, "train", True)
        )
        assert overlapped.size > disjoint.size


def test_items_read_end_to_end(default_root):
    dataset = build_dataset("synthetic", default_root, "15-1", 2, "train", overlap=True)
    image, label = dataset[0]
    assert image.shape == (3, 96, 128) and image.dtype == torch.uint8
    assert set(label.unique().tolist()) <= set(range(18))  # 255 and future classes are background
    assert 17 in label.unique().tolist()


def test_generation_is_deterministic_and_idempotent(tmp_path):
    first = generate_synthetic_voc(str(tmp_path / "a"), num_train=20, num_val=5, width=48, height=32, seed=1)
    second = generate_synthetic_voc(str(tmp_path / "b"), num_train=20, num_val=5, width=48, height=32, seed=1)
    label = os.path.join("SegmentationClassAug", "syn_train_000007.png")
    image = os.path.join("JPEGImages", "syn_val_000003.jpg")
    for name in (label, image):
        with open(os.path.join(first, name), "rb") as a, open(os.path.join(second, name), "rb") as b:
            assert a.read() == b.read()

    stamp = os.stat(os.path.join(first, label)).st_mtime_ns
    generate_synthetic_voc(first, num_train=20, num_val=5, width=48, height=32, seed=1)
    assert os.stat(os.path.join(first, label)).st_mtime_ns == stamp  # finished: left alone

    os.remove(os.path.join(first, MARKER))  # as if interrupted
    os.remove(os.path.join(first, label))
    generate_synthetic_voc(first, num_train=20, num_val=5, width=48, height=32, seed=1)
    assert os.path.isfile(os.path.join(first, label)) and os.path.isfile(os.path.join(first, MARKER))

    other = generate_synthetic_voc(first, num_train=10, num_val=5, width=48, height=32, seed=2)
    with open(os.path.join(other, "splits", "train_aug.txt")) as handle:
        assert len(handle.readlines()) == 10
    assert not os.path.exists(os.path.join(other, "JPEGImages", "syn_train_000015.jpg"))


def test_tiny_ade_tree_is_read_by_the_ade_reader(tmp_path):
    generate_synthetic_ade(str(tmp_path / "ADEChallengeData2016"), num_train=6, num_val=3)
    train = build_dataset("ade", str(tmp_path), "offline", 0, "train")
    assert train.base_indices.tolist() == list(range(6))
    image, label = train[0]
    raw = np.array(Image.open(train.label_paths[0]))
    assert image.shape[1:] == label.shape == raw.shape
    assert torch.equal(label, torch.from_numpy(raw.astype(np.int64)))  # offline: identity, 0 stays 0
    _, test_label = build_dataset("ade", str(tmp_path), "offline", 0, "test")[0]
    assert 0 not in test_label.unique().tolist() and 255 in test_label.unique().tolist()


def test_class_names_and_palette():
    assert len(CLASS_NAMES["voc"]) == 21 and CLASS_NAMES["voc"][15] == "person"
    assert (
        len(CLASS_NAMES["ade"]) == 151
        and CLASS_NAMES["ade"][1] == "wall"
        and CLASS_NAMES["ade"][150] == "flag"
    )
    assert len(CLASS_NAMES["synthetic"]) == 21 and len(set(CLASS_NAMES["synthetic"])) == 21
    palette = color_palette()
    assert palette.shape == (256, 3)
    assert palette[[0, 1, 2, 15, 255]].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [192, 128, 128],
        [224, 224, 192],
    ]
    rgb = colorize(torch.tensor([[0, 1], [255, 2]]))
    assert rgb.shape == (3, 2, 2) and rgb.dtype == torch.uint8
    assert rgb[:, 1, 0].tolist() == [224, 224, 192]
