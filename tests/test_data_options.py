"""Data options of the original command line: --no_mask (old classes kept in training and validation labels) and
--cross_val (held-out 20% of the training images)."""
from segmentation.data.dataset import held_out_split
from segmentation.data.protocol import IGNORE_INDEX, label_lut
from segmentation.tasks import channel_order


def test_no_mask_keeps_old_classes_in_training_and_validation_labels():
    order = channel_order("voc", "15-5s", 2)  # old 1..16, current 17
    masked = label_lut("voc", "15-5s", 2, "train")
    kept = label_lut("voc", "15-5s", 2, "train", mask_old=False)
    for label in range(1, 17):
        assert masked[label] == 0 and kept[label] == order.index(label)
    assert masked[17] == kept[17] == order.index(17)
    for label in (18, 19, 20):  # future classes stay background
        assert kept[label] == 0
    assert kept[255] == 0 and kept[0] == 0
    # The original built the validation labels with the same switch: old classes keep their
    # channel there too, future classes and void stay ignored.
    val_masked = label_lut("voc", "15-5s", 2, "val")
    val_kept = label_lut("voc", "15-5s", 2, "val", mask_old=False)
    for label in range(1, 17):
        assert val_masked[label] == IGNORE_INDEX and val_kept[label] == order.index(label)
    for label in (18, 19, 20, 255):
        assert val_kept[label] == IGNORE_INDEX
    assert val_kept[0] == 0 and val_kept[17] == order.index(17)
    # ADE: "other" (0) stays ignored in validation, old classes are kept.
    ade_order = channel_order("ade", "100-50", 1)
    ade_val = label_lut("ade", "100-50", 1, "val", mask_old=False)
    assert ade_val[0] == IGNORE_INDEX and ade_val[3] == ade_order.index(3) and ade_val[120] == ade_order.index(120)
    # The test split keeps every seen class either way.
    assert (label_lut("voc", "15-5s", 2, "test", mask_old=False) == label_lut("voc", "15-5s", 2, "test")).all()


def test_held_out_split_is_a_seeded_80_20_partition():
    train, held_out = held_out_split(23, seed=42)
    assert len(train) == 18 and len(held_out) == 5
    assert sorted(train + held_out) == list(range(23))
    assert held_out_split(23, seed=42) == (train, held_out)
    assert held_out_split(23, seed=7) != (train, held_out)
