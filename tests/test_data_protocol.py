"""Image filtering and label mapping of the incremental protocol, on hand-made VOC and ADE trees."""

import itertools
import os

import numpy as np
import pytest
import torch

from segmentation.data import build_dataset
from segmentation.data.protocol import (
    INVALID,
    SplitFilter,
    filter_presence,
    keep_image,
    label_lut,
    split_filter,
)
from segmentation.data.synthetic import item_with_labels, write_ade_layout, write_voc_layout
from segmentation.tasks import NUM_LABELS, channel_order, labels_of_step, num_steps, old_labels

# Label sets of the tiny VOC tree (train_aug.txt order, then val.txt order).
VOC_TRAIN = [{15}, {16}, {3, 17}, {5, 255}, {0}, {16, 20}, {2, 19}, {1, 255, 18}]
VOC_VAL = [{1, 16}, {17}, {0}, {4, 255}]
# ADE tree; 2 and 4 are order-b increments (100-50b step 1), 1, 3 and 150 are order-b base classes.
ADE_TRAIN = [{0, 1}, {2}, {1, 2}, {0}, {150, 3}]
ADE_VAL = [{0, 2}, {3}, {0}, {4}]


def _items(label_sets):
    return [item_with_labels(sorted(labels), seed=i) for i, labels in enumerate(label_sets)]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("voc"))
    write_voc_layout(os.path.join(root, "PascalVOC12"), _items(VOC_TRAIN), _items(VOC_VAL))
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ade"))
    write_ade_layout(os.path.join(root, "ADEChallengeData2016"), _items(ADE_TRAIN), _items(ADE_VAL))
    return root


def _indices(root, name, task, split, overlap, steps=None):
    steps = range(num_steps(name, task)) if steps is None else steps
    return [build_dataset(name, root, task, step, split, overlap).base_indices.tolist() for step in steps]


# Expected indices, worked out by hand from VOC_TRAIN / VOC_VAL and the disjoint/overlapped rules.
@pytest.mark.parametrize(
    "task, overlap, expected",
    [
        ("15-5", False, [[0, 3], [1, 2, 5, 6, 7]]),
        ("15-5", True, [[0, 2, 3, 6, 7], [1, 2, 5, 6, 7]]),
        ("15-1", False, [[0, 3], [1], [2], [7], [6], [5]]),
        ("15-1", True, [[0, 2, 3, 6, 7], [1, 5], [2], [7], [6], [5]]),
    ],
)
def test_voc_train_filter(voc_root, task, overlap, expected):
    assert _indices(voc_root, "voc", task, "train", overlap) == expected


@pytest.mark.parametrize("overlap", [False, True])
def test_voc_val_and_test_filter_ignore_overlap(voc_root, overlap):
    # Val: overlapped filter on the current labels; test: on all seen labels.
    assert _indices(voc_root, "voc", "15-5", "val", overlap) == [[0, 3], [0, 1]]
    assert _indices(voc_root, "voc", "15-5", "test", overlap) == [[0, 3], [0, 1, 3]]
    assert _indices(voc_root, "voc", "15-1", "val", overlap, steps=[0, 1, 2]) == [[0, 3], [0], [1]]
    assert _indices(voc_root, "voc", "15-1", "test", overlap) == [
        [0, 3],
        [0, 3],
        [0, 1, 3],
        [0, 1, 3],
        [0, 1, 3],
        [0, 1, 3],
    ]


@pytest.mark.parametrize("overlap, expected", [(False, [[0, 4], [1, 2]]), (True, [[0, 2, 4], [1, 2]])])
def test_ade_order_b_filter(ade_root, overlap, expected):
    assert _indices(ade_root, "ade", "100-50b", "train", overlap) == expected
    assert _indices(ade_root, "ade", "100-50b", "val", overlap) == [[1], [0, 3]]
    assert _indices(ade_root, "ade", "100-50b", "test", overlap) == [[1], [0, 1, 3]]


def _reference_target(value, family, split, order, current, old):
    """The label mapping of every split (train, val, test), one pixel at a time."""
    if family == "voc" and value == 255:
        return 0 if split == "train" else 255
    if family == "voc" and value == 0:
        return 0
    if family == "ade" and value == 0:
        return 0 if split == "train" else 255
    if value in current or (split == "test" and value in old):
        return order.index(value)
    return 0 if split == "train" else 255


@pytest.mark.parametrize(
    "dataset, task",
    [("voc", "15-5"), ("voc", "15-1"), ("voc", "19-1b"), ("ade", "100-50b"), ("ade", "100-10")],
)
def test_label_lut_matches_reference_tables(dataset, task):
    family = "ade" if dataset == "ade" else "voc"
    valid = set(range(NUM_LABELS[dataset])) | ({255} if family == "voc" else set())
    for step, split in itertools.product(range(num_steps(dataset, task)), ("train", "val", "test")):
        lut = label_lut(dataset, task, step, split)
        order = channel_order(dataset, task, step)
        current = set(labels_of_step(dataset, task, step)) - {0}
        old = set(old_labels(dataset, task, step)) - {0}
        expected = [
            _reference_target(v, family, split, order, current, old) if v in valid else INVALID
            for v in range(256)
        ]
        assert lut.tolist() == expected, (task, step, split)


def test_known_lut_entries():
    train, val, test = (label_lut("voc", "15-5", 1, split) for split in ("train", "val", "test"))
    assert train[[0, 3, 16, 20, 255, 21]].tolist() == [0, 0, 16, 20, 0, INVALID]
    assert val[[0, 3, 16, 255]].tolist() == [0, 255, 16, 255]
    assert test[[0, 3, 16, 255]].tolist() == [0, 3, 16, 255]
    # ADE order b, step 1: label 3 is base channel 2; label 2 is the first increment (channel 101).
    train, val, test = (label_lut("ade", "100-50b", 1, split) for split in ("train", "val", "test"))
    assert train[[0, 3, 2, 4, 151]].tolist() == [0, 0, 101, 102, INVALID]
    assert val[[0, 3, 2]].tolist() == [255, 255, 101]
    assert test[[0, 3, 2]].tolist() == [255, 2, 101]


def test_items_are_mapped_with_the_lut(voc_root, ade_root):
    dataset = build_dataset("voc", voc_root, "15-5", 1, "train", overlap=False)
    position = dataset.base_indices.tolist().index(7)  # labels {1, 255, 18}
    image, label = dataset[position]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert label.dtype == torch.int64 and label.shape == (8, 8)
    raw = item_with_labels(sorted(VOC_TRAIN[7]), seed=7)[1]
    assert torch.equal(label, torch.from_numpy(label_lut("voc", "15-5", 1, "train")[raw]))
    assert set(label.unique().tolist()) == {0, 18}
    assert dataset.channel_order == list(range(21))

    dataset = build_dataset("ade", ade_root, "100-50b", 1, "val")
    _, label = dataset[dataset.base_indices.tolist().index(0)]  # labels {0, 2}
    assert set(label.unique().tolist()) == {255, 101}
    assert dataset.channel_order == channel_order("ade", "100-50b", 1)


def test_keep_image_predicate():
    assert keep_image({0, 16}, [16], range(16), overlap=False)
    assert keep_image({0, 3, 255, 16}, [16], range(16), overlap=False)
    assert not keep_image({3, 16, 17}, [16], range(16), overlap=False)
    assert keep_image({3, 16, 17}, [16], range(16), overlap=True)
    assert not keep_image({0, 3, 255}, [16], range(16), overlap=True)


def test_filter_presence_matches_predicate():
    rng = np.random.default_rng(0)
    presence = rng.random((300, 256)) < 0.04
    presence[:, 22:255] = False  # VOC values only
    for step, split, overlap in itertools.product(range(6), ("train", "val", "test"), (False, True)):
        rule = split_filter("voc", "15-1", step, split, overlap)
        expected = [
            i
            for i in range(300)
            if keep_image(np.flatnonzero(presence[i]), rule.current, rule.old, rule.overlap)
        ]
        assert filter_presence(presence, rule).tolist() == expected


def test_split_filter_rules():
    assert split_filter("voc", "15-1", 2, "train", False) == SplitFilter((17,), tuple(range(17)), False)
    assert split_filter("voc", "15-1", 2, "val", False) == SplitFilter((17,), tuple(range(17)), True)
    assert split_filter("voc", "15-1", 2, "test", False) == SplitFilter(tuple(range(1, 18)), (), True)
