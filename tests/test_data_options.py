"""Data options of the original command line: --no_mask (old classes kept in training labels) and
--cross_val (held-out 20% of the training images)."""
from segmentation.data.dataset import held_out_split
from segmentation.data.protocol import IGNORE_INDEX, label_lut
from segmentation.tasks import channel_order


def test_no_mask_keeps_old_classes_in_training_labels_only():
    order = channel_order("voc", "15-5s", 2)  # old 1..16, current 17
    masked = label_lut("voc", "15-5s", 2, "train")
    kept = label_lut("voc", "15-5s", 2, "train", mask_old=False)
    for label in range(1, 17):
        assert masked[label] == 0 and kept[label] == order.index(label)
    assert masked[17] == kept[17] == order.index(17)
    for label in (18, 19, 20):  # future classes stay background
        assert kept[label] == 0
    assert kept[255] == 0 and kept[0] == 0
    # Validation still ignores old classes; the option only concerns training labels.
    assert (label_lut("voc", "15-5s", 2, "val", mask_old=False) == label_lut("voc", "15-5s", 2, "val")).all()
    assert label_lut("voc", "15-5s", 2, "val")[1] == IGNORE_INDEX


def test_held_out_split_is_a_seeded_80_20_partition():
    train, held_out = held_out_split(23, seed=42)
    assert len(train) == 18 and len(held_out) == 5
    assert sorted(train + held_out) == list(range(23))
    assert held_out_split(23, seed=42) == (train, held_out)
    assert held_out_split(23, seed=7) != (train, held_out)
