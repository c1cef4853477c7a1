"""Confusion matrix and scores against hand-computed values; all-reduce over two real processes."""
from fractions import Fraction

import pytest
import torch

import dist_metrics_worker
from segmentation.metrics import ConfusionMatrix, group_scores, segmentation_scores
from train_cli_worker import run_forked_ranks

# 4 classes; pixel (1, 2) is ignored; class 2 has no ground truth but is predicted twice.
TARGET = torch.tensor([[0, 0, 1, 1],
                       [1, 3, 255, 0]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [2, 3, 0, 2]])
# (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (1,2) (3,3) (0,2); the ignored (255,0) is dropped.
HAND_MATRIX = torch.tensor([[1, 1, 1, 0],
                            [0, 2, 1, 0],
                            [0, 0, 0, 0],
                            [0, 0, 0, 1]])
# Row sums 3, 3, 0, 1; column sums 1, 3, 2, 1; 7 counted pixels, trace 4.
HAND_CLASS_ACC = [Fraction(1, 3), Fraction(2, 3), None, Fraction(1, 1)]
HAND_CLASS_IOU = [Fraction(1, 3 + 1 - 1), Fraction(2, 3 + 3 - 2), None, Fraction(1, 1 + 1 - 1)]


def assert_close_or_none(values, expected):
    assert len(values) == len(expected)
    for value, want in zip(values, expected):
        if want is None:
            assert value is None
        else:
            assert value == pytest.approx(float(want), abs=1e-12)


def test_confusion_matrix_by_hand():
    metric = ConfusionMatrix(4)
    metric.update(PRED, TARGET)
    assert metric.matrix.dtype == torch.int64
    assert torch.equal(metric.matrix, HAND_MATRIX)


def test_update_accumulates_and_reset_clears():
    metric = ConfusionMatrix(4)
    metric.update(PRED[:1], TARGET[:1])
    metric.update(PRED[1:].to(torch.uint8), TARGET[1:].to(torch.uint8))
    assert torch.equal(metric.matrix, HAND_MATRIX)
    metric.reset()
    assert torch.equal(metric.matrix, torch.zeros(4, 4, dtype=torch.int64))


def test_targets_outside_the_classes_are_not_counted():
    metric = ConfusionMatrix(3, ignore_index=-1)
    metric.update(torch.tensor([0, 1, 2, 1, 0]), torch.tensor([0, 3, -1, 255, 2]))
    assert torch.equal(metric.matrix, torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0]]))


def test_all_reduce_without_process_group_is_a_no_op():
    metric = ConfusionMatrix(4)
    metric.update(PRED, TARGET)
    metric.all_reduce()
    assert torch.equal(metric.matrix, HAND_MATRIX)


def test_invalid_inputs_raise():
    metric = ConfusionMatrix(4)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(PRED, TARGET[:1])
    with pytest.raises(ValueError, match="predictions"):
        metric.update(torch.tensor([4]), torch.tensor([0]))
    with pytest.raises(ValueError, match="square"):
        segmentation_scores(torch.zeros(2, 3))


def test_segmentation_scores_by_hand():
    scores = segmentation_scores(HAND_MATRIX)
    assert scores["overall_acc"] == pytest.approx(4 / 7)
    assert_close_or_none(scores["class_acc"], HAND_CLASS_ACC)
    assert scores["mean_acc"] == pytest.approx((1 / 3 + 2 / 3 + 1) / 3)
    assert_close_or_none(scores["class_iou"], HAND_CLASS_IOU)
    # Class 2 (predicted, no GT) is excluded from the mean although its IoU would be 0.
    assert scores["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert scores["freq_weighted_iou"] == pytest.approx(3 / 7 * 1 / 3 + 3 / 7 * 1 / 2 + 1 / 7 * 1)


def test_segmentation_scores_of_an_empty_matrix():
    scores = segmentation_scores(torch.zeros(3, 3, dtype=torch.int64))
    assert scores["class_iou"] == [None, None, None] and scores["class_acc"] == [None, None, None]
    assert scores["overall_acc"] is None and scores["miou"] is None
    assert scores["mean_acc"] is None and scores["freq_weighted_iou"] is None


def test_group_scores_by_hand():
    # class_iou of HAND_MATRIX = [1/3, 1/2, None, 1]; step 0 had channels 0 and 1.
    scores = group_scores(segmentation_scores(HAND_MATRIX)["class_iou"], num_old_channels=2)
    expected = {
        "miou_all": (1 / 3 + 1 / 2 + 1) / 3,
        "miou_old": (1 / 3 + 1 / 2) / 2,
        "miou_new": 1.0,
        "miou_all_fg": (1 / 2 + 1) / 2,
        "miou_old_fg": 1 / 2,
        "miou_new_fg": 1.0,
        "hmean": 2 * (5 / 12) * 1 / (5 / 12 + 1),
        "hmean_fg": 2 * (1 / 2) * 1 / (1 / 2 + 1),
    }
    assert scores == pytest.approx(expected)


def test_group_scores_paper_arithmetic():
    # VOC 15-5 layout: the paper's "all" column is (15 * old + 5 * new) / 20 over foreground only.
    class_iou = [0.9] + [0.6] * 15 + [0.2] * 5
    scores = group_scores(class_iou, num_old_channels=16)
    assert scores["miou_all_fg"] == pytest.approx((15 * 0.6 + 5 * 0.2) / 20)
    assert scores["miou_all"] == pytest.approx((0.9 + 15 * 0.6 + 5 * 0.2) / 21)
    assert scores["miou_old"] == pytest.approx((0.9 + 15 * 0.6) / 16)
    assert scores["miou_old_fg"] == pytest.approx(0.6)


def test_group_scores_with_empty_groups():
    step0 = group_scores([0.9, 0.5, None], num_old_channels=3)
    assert step0["miou_new"] is None and step0["hmean"] is None and step0["hmean_fg"] is None
    assert step0["miou_old"] == pytest.approx(0.7) and step0["miou_old_fg"] == pytest.approx(0.5)
    no_valid_new = group_scores([0.9, 0.5, None, None], num_old_channels=2)
    assert no_valid_new["miou_new"] is None and no_valid_new["miou_all"] == pytest.approx(0.7)
    background_only = group_scores([0.9, 0.4], num_old_channels=1)
    assert background_only["miou_old_fg"] is None and background_only["hmean_fg"] is None
    assert background_only["hmean"] == pytest.approx(2 * 0.9 * 0.4 / 1.3)
    assert group_scores([0.0, 0.0], num_old_channels=1)["hmean"] == 0.0
    with pytest.raises(ValueError, match="num_old_channels"):
        group_scores([0.5, 0.5], num_old_channels=0)


@pytest.mark.distributed
def test_all_reduce_over_two_processes_equals_single_process(tmp_path):
    num_classes, num_images = 6, 7  # odd: the ranks get shards of different sizes
    generator = torch.Generator().manual_seed(1234)
    targets = [torch.randint(0, num_classes, (5, 8), generator=generator) for _ in range(num_images)]
    for target in targets:
        target[torch.rand(target.shape, generator=generator) < 0.1] = 255
    preds = [torch.randint(0, num_classes, (5, 8), generator=generator) for _ in range(num_images)]
    torch.save({"num_classes": num_classes, "preds": preds, "targets": targets}, tmp_path / "dataset.pt")

    # tests/dist_metrics_worker.py's main (a torchrun script) in 2 processes with torchrun's variables,
    # forked from this one: what they compute together is tested here, not the launch.
    run_forked_ranks(lambda: dist_metrics_worker.main(str(tmp_path)), nprocs=2)

    single = ConfusionMatrix(num_classes)
    for pred, target in zip(preds, targets):
        single.update(pred, target)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"matrix_rank{rank}.pt"), single.matrix)
