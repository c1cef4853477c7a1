"""Data options of the original command line: --no_mask (old classes kept in training and validation labels),
--cross_val (held-out 20% of the training images), and PLOP's --data_masking and --ignore_test_bg (label maps;
--test_on_val, which picks images, is in test_data_protocol.py)."""
import pytest

from segmentation.data.dataset import held_out_split
from segmentation.data.protocol import IGNORE_INDEX, INVALID, label_lut
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


# VOC 15-1 step 1, labels 0, 3 (old), 16 (current), 17 (future), 255 (void), 21 (not VOC), by hand
# from plop-spec section 2.1: PLOP's masking acts on the training and validation labels alike.
VALUES = [0, 3, 16, 17, 255, 21]
PLOP_MASKING = {
    "current": [0, 0, 16, 0, 255, INVALID],
    "current+old": [0, 3, 16, 0, 255, INVALID],  # old classes keep their channel (an oracle)
    "new": [0, 255, 16, 255, 255, INVALID],  # all but the background and current classes ignored
}


@pytest.mark.parametrize("masking", list(PLOP_MASKING))
def test_plop_data_masking_of_training_and_validation_labels(masking):
    for split in ("train", "val"):
        lut = label_lut("voc", "15-1", 1, split, protocol="plop", data_masking=masking)
        assert lut[VALUES].tolist() == PLOP_MASKING[masking], split
    # The test labels are never masked; ADE ignores the option.
    assert label_lut("voc", "15-1", 1, "test", protocol="plop", data_masking=masking)[VALUES].tolist() == [
        0, 3, 16, 0, 255, INVALID]
    for split in ("train", "val", "test"):
        assert (label_lut("ade", "100-10", 1, split, protocol="plop", data_masking=masking)
                == label_lut("ade", "100-10", 1, split, protocol="plop")).all()
    # At step 0 "new" also ignores the future classes in training.
    if masking == "new":
        assert label_lut("voc", "15-1", 0, "train", protocol="plop", data_masking="new")[[0, 3, 17, 255]].tolist() == [
            0, 3, 255, 255]


def test_data_masking_belongs_to_the_plop_protocol():
    with pytest.raises(ValueError, match="plop"):
        label_lut("voc", "15-1", 1, "train", data_masking="new")
    with pytest.raises(ValueError, match="unknown data masking 'all'"):
        label_lut("voc", "15-1", 1, "train", protocol="plop", data_masking="all")


def test_no_mask_under_the_plop_protocol_keeps_old_classes_as_current_plus_old_does():
    for split in ("train", "val"):
        assert (label_lut("voc", "15-1", 1, split, mask_old=False, protocol="plop")
                == label_lut("voc", "15-1", 1, split, protocol="plop", data_masking="current+old")).all()


def test_ignore_test_bg_ignores_other_and_future_classes_in_the_ade_test():
    # ADE 100-10 step 1, labels 0 ("other"), 3 (old), 105 (current), 120 (future), 151 (not ADE).
    values = [0, 3, 105, 120, 151]
    plop = label_lut("ade", "100-10", 1, "test", protocol="plop")
    ignored = label_lut("ade", "100-10", 1, "test", protocol="plop", ignore_test_bg=True)
    assert plop[values].tolist() == [0, 3, 105, 0, INVALID]
    assert ignored[values].tolist() == [IGNORE_INDEX, 3, 105, IGNORE_INDEX, INVALID]
    # MiB's test already ignores them; training and validation labels are unchanged.
    assert (label_lut("ade", "100-10", 1, "test", ignore_test_bg=True) == label_lut("ade", "100-10", 1, "test")).all()
    assert (ignored == label_lut("ade", "100-10", 1, "test")).all()
    for split in ("train", "val"):
        assert (label_lut("ade", "100-10", 1, split, protocol="plop", ignore_test_bg=True)
                == label_lut("ade", "100-10", 1, split, protocol="plop")).all()
