"""Image filtering and label mapping of the incremental protocol (MiB's and PLOP's label mappings), on
hand-made VOC and ADE trees."""

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
    label_fates,
    label_lut,
    shuffled_80_20_part,
    split_filter,
)
from segmentation.data.synthetic import item_with_labels, write_ade_layout, write_voc_layout
from segmentation.metrics import ConfusionMatrix, group_scores, segmentation_scores
from segmentation.tasks import NUM_LABELS, channel_order, classes_per_step, labels_of_step, num_steps, old_labels

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


def _reference_target(value, family, split, order, current, old, protocol):
    """The label mapping of every split (train, val, test), one pixel at a time: MiB's (mib-spec)
    or PLOP's (plop-spec section 7.3: everything left out is background in every split, VOC void
    is always ignored)."""
    if family == "voc" and value == 255:
        return 0 if split == "train" and protocol == "mib" else 255
    if family == "voc" and value == 0:
        return 0
    if value in current or (split == "test" and value in old):
        return order.index(value)
    return 0 if split == "train" or protocol == "plop" else 255


@pytest.mark.parametrize("protocol", ["mib", "plop"])
@pytest.mark.parametrize(
    "dataset, task",
    [("voc", "15-5"), ("voc", "15-1"), ("voc", "19-1b"), ("ade", "100-50b"), ("ade", "100-10"),
     ("synthetic", "15-1")],
)
def test_label_lut_matches_reference_tables(dataset, task, protocol):
    family = "ade" if dataset == "ade" else "voc"
    valid = set(range(NUM_LABELS[dataset])) | ({255} if family == "voc" else set())
    for step, split in itertools.product(range(num_steps(dataset, task)), ("train", "val", "test")):
        lut = label_lut(dataset, task, step, split, protocol=protocol)
        order = channel_order(dataset, task, step)
        current = set(labels_of_step(dataset, task, step)) - {0}
        old = set(old_labels(dataset, task, step)) - {0}
        expected = [
            _reference_target(v, family, split, order, current, old, protocol) if v in valid else INVALID
            for v in range(256)
        ]
        assert lut.tolist() == expected, (task, step, split)


# Hand-written from the tables of protocol.py (MiB) and plop-spec section 7.3 (PLOP).
# VOC 15-1, labels 0, 3, 16, 17, 255, 21: at step 0, 3 is current and 16, 17 future; at step 1,
# 3 is old, 16 current (channel 16) and 17 future. 21 is not a VOC value.
VOC_VALUES = [0, 3, 16, 17, 255, 21]
VOC_TABLES = {
    ("mib", 0): {"train": [0, 3, 0, 0, 0, INVALID], "val": [0, 3, 255, 255, 255, INVALID],
                 "test": [0, 3, 255, 255, 255, INVALID]},
    ("mib", 1): {"train": [0, 0, 16, 0, 0, INVALID], "val": [0, 255, 16, 255, 255, INVALID],
                 "test": [0, 3, 16, 255, 255, INVALID]},
    ("plop", 0): {"train": [0, 3, 0, 0, 255, INVALID], "val": [0, 3, 0, 0, 255, INVALID],
                  "test": [0, 3, 0, 0, 255, INVALID]},
    ("plop", 1): {"train": [0, 0, 16, 0, 255, INVALID], "val": [0, 0, 16, 0, 255, INVALID],
                  "test": [0, 3, 16, 0, 255, INVALID]},
}
# ADE 100-10, labels 0 ("other"), 3, 105, 120, 150, 151, 255: at step 0, 3 is current, 105, 120
# and 150 future; at step 1, 3 is old, 105 current (channel 105), 120 and 150 future.
ADE_VALUES = [0, 3, 105, 120, 150, 151, 255]
ADE_TABLES = {
    ("mib", 0): {"train": [0, 3, 0, 0, 0, INVALID, INVALID], "val": [255, 3, 255, 255, 255, INVALID, INVALID],
                 "test": [255, 3, 255, 255, 255, INVALID, INVALID]},
    ("mib", 1): {"train": [0, 0, 105, 0, 0, INVALID, INVALID], "val": [255, 255, 105, 255, 255, INVALID, INVALID],
                 "test": [255, 3, 105, 255, 255, INVALID, INVALID]},
    ("plop", 0): {"train": [0, 3, 0, 0, 0, INVALID, INVALID], "val": [0, 3, 0, 0, 0, INVALID, INVALID],
                  "test": [0, 3, 0, 0, 0, INVALID, INVALID]},
    ("plop", 1): {"train": [0, 0, 105, 0, 0, INVALID, INVALID], "val": [0, 0, 105, 0, 0, INVALID, INVALID],
                  "test": [0, 3, 105, 0, 0, INVALID, INVALID]},
}


@pytest.mark.parametrize("protocol, step", list(VOC_TABLES))
def test_label_luts_of_both_protocols_by_hand(protocol, step):
    for split in ("train", "val", "test"):
        voc = label_lut("voc", "15-1", step, split, protocol=protocol)
        assert voc[VOC_VALUES].tolist() == VOC_TABLES[protocol, step][split], ("voc", split)
        synthetic = label_lut("synthetic", "15-1", step, split, protocol=protocol)
        assert synthetic.tolist() == voc.tolist(), ("synthetic", split)  # follows VOC
        ade = label_lut("ade", "100-10", step, split, protocol=protocol)
        assert ade[ADE_VALUES].tolist() == ADE_TABLES[protocol, step][split], ("ade", split)


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown label protocol 'sdr'"):
        label_lut("voc", "15-1", 1, "train", protocol="sdr")


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


def test_items_are_mapped_with_the_plop_lut(voc_root, ade_root):
    # PLOP: VOC void stays ignored in training, the old class 1 becomes background.
    dataset = build_dataset("voc", voc_root, "15-5", 1, "train", overlap=False, protocol="plop")
    _, label = dataset[dataset.base_indices.tolist().index(7)]  # labels {1, 255, 18}
    assert set(label.unique().tolist()) == {0, 18, 255}
    # ADE "other" (0) is background in validation.
    dataset = build_dataset("ade", ade_root, "100-50b", 1, "val", protocol="plop")
    _, label = dataset[dataset.base_indices.tolist().index(0)]  # labels {0, 2}
    assert set(label.unique().tolist()) == {0, 101}


def test_plop_ade_test_scores_other_as_class_0_of_the_old_group(ade_root):
    # A model that predicts class 0 everywhere, on the test of 100-50b step 1 (image 0 shows "other").
    step0_channels = classes_per_step("ade", "100-50b", 1)[0]
    scores = {}
    for protocol in ("mib", "plop"):
        dataset = build_dataset("ade", ade_root, "100-50b", 1, "test", protocol=protocol)
        matrix = ConfusionMatrix(len(dataset.channel_order))
        for index in range(len(dataset)):
            _, label = dataset[index]
            matrix.update(torch.zeros_like(label), label)
        class_iou = segmentation_scores(matrix.matrix)["class_iou"]
        scores[protocol] = (class_iou[0], group_scores(class_iou, step0_channels))
    iou, groups = scores["plop"]
    assert iou > 0  # "other" is scored as class 0, counted in the old group ("0-100" in PLOP's tables)
    assert groups["miou_old"] == pytest.approx(iou / 2)  # with the old class 3, never predicted
    assert groups["miou_old_fg"] == 0.0
    iou, groups = scores["mib"]
    assert iou is None and groups["miou_old"] == groups["miou_old_fg"] == 0.0  # MiB ignores "other"


def test_label_fates_read_the_lut():
    assert label_fates("voc", "15-1", 0, label_lut("voc", "15-1", 0, "val")) == {"future": "ignored"}
    assert label_fates("voc", "15-1", 1, label_lut("voc", "15-1", 1, "val", protocol="plop")) == {
        "old": "background", "future": "background"}
    assert label_fates("voc", "15-1", 5, label_lut("voc", "15-1", 5, "test")) == {"old": "kept"}
    assert label_fates("ade", "100-10", 1, label_lut("ade", "100-10", 1, "test", protocol="plop")) == {
        "old": "kept", "future": "background", "other": "background"}
    assert label_fates("ade", "100-10", 1, label_lut("ade", "100-10", 1, "test")) == {
        "old": "kept", "future": "ignored", "other": "ignored"}


def test_shuffled_80_20_part_is_numpy_random_state_1():
    # RandomState(1) shuffles 0..9 to [2, 9, 6, 4, 0, 3, 1, 7, 8, 5]: the first 8, then the last 2.
    order = list(range(10))
    np.random.RandomState(1).shuffle(order)
    assert order == [2, 9, 6, 4, 0, 3, 1, 7, 8, 5]
    assert shuffled_80_20_part(np.arange(10), first=True).tolist() == [0, 1, 2, 3, 4, 6, 7, 9]
    assert shuffled_80_20_part(np.arange(10), first=False).tolist() == [5, 8]
    # The indices are shuffled in their given order (a split file's order), not sorted first.
    assert shuffled_80_20_part(np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]), first=False).tolist() == [1, 4]


def test_test_on_val_cuts_the_train_and_test_splits(voc_root):
    def indices(step, split, **options):
        return build_dataset("voc", voc_root, "15-5", step, split, overlap=True, **options).base_indices.tolist()

    # By hand: RandomState(1) shuffles the train indices [0, 2, 3, 6, 7] of step 0 to [3, 2, 7, 0, 6]
    # (the train split keeps the first int(0.8 * 5) = 4) and the test indices [0, 1, 3] of step 1
    # to [0, 3, 1] (the test split keeps what follows the first int(0.8 * 3) = 2).
    assert indices(0, "train") == [0, 2, 3, 6, 7] and indices(1, "test") == [0, 1, 3]
    train_order, test_order = [0, 2, 3, 6, 7], [0, 1, 3]
    np.random.RandomState(1).shuffle(train_order)
    np.random.RandomState(1).shuffle(test_order)
    assert (train_order, test_order) == ([3, 2, 7, 0, 6], [0, 3, 1])
    assert indices(0, "train", test_on_val=True) == [0, 2, 3, 7]
    assert indices(1, "test", test_on_val=True) == [1]
    assert indices(1, "val", test_on_val=True) == indices(1, "val")  # validation is not cut
    # A test split drawn from the train list (--val_on_trainset) keeps the first 80 %, as the
    # original's datasets built with train=True.
    whole = indices(1, "test", images_from="train")
    shuffled = list(whole)
    np.random.RandomState(1).shuffle(shuffled)
    assert indices(1, "test", images_from="train", test_on_val=True) == sorted(shuffled[:int(0.8 * len(whole))])


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
