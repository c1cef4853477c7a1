"""Bad input: every problem a user can hit is a clear error that names the file at fault."""

import os

import numpy as np
import pytest
from PIL import Image

from segmentation.data import DatasetError, build_dataset
from segmentation.data import splits
from segmentation.data.synthetic import item_with_labels, write_ade_layout, write_voc_layout

LABELS = [{1}, {2, 255}, {16}, {3, 17}]


@pytest.fixture
def voc_root(tmp_path):
    items = [item_with_labels(sorted(s), seed=i) for i, s in enumerate(LABELS)]
    write_voc_layout(str(tmp_path / "PascalVOC12"), items, items)
    return str(tmp_path)


def _path(root, kind, index, split="train"):
    folder, ext = ("JPEGImages", "jpg") if kind == "image" else ("SegmentationClassAug", "png")
    return os.path.join(root, "PascalVOC12", folder, f"syn_{split}_{index:06d}.{ext}")


def _build(root, **kwargs):
    return build_dataset("voc", root, "15-5", 0, "train", **kwargs)


def test_missing_root_and_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data root .*nowhere"):
        _build(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="PascalVOC12"):
        _build(str(tmp_path))


def test_missing_list_file(voc_root):
    os.remove(os.path.join(voc_root, "PascalVOC12", "splits", "val.txt"))
    with pytest.raises(FileNotFoundError, match="val.txt"):
        build_dataset("voc", voc_root, "15-5", 0, "val")


def test_malformed_list_line(voc_root):
    with open(os.path.join(voc_root, "PascalVOC12", "splits", "train_aug.txt"), "a") as handle:
        handle.write("/JPEGImages/only_one_path.jpg\n")
    with pytest.raises(DatasetError, match="train_aug.txt, line 5"):
        _build(voc_root)


@pytest.mark.parametrize("kind", ["image", "label"])
def test_listed_file_missing(voc_root, kind):
    os.remove(_path(voc_root, kind, 2))
    with pytest.raises(FileNotFoundError, match=f"{kind} .*syn_train_000002"):
        _build(voc_root)


def test_file_removed_after_split_computation(voc_root):
    dataset = _build(voc_root)
    os.remove(_path(voc_root, "image", 0))
    with pytest.raises(FileNotFoundError, match="syn_train_000000.jpg"):
        dataset[0]


def test_corrupt_image(voc_root):
    with open(_path(voc_root, "image", 1), "wb") as handle:
        handle.write(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DatasetError, match="syn_train_000001.jpg.* cannot be read"):
        _build(voc_root)


def test_truncated_image_fails_when_loaded(voc_root):
    dataset = _build(voc_root)
    path = _path(voc_root, "image", int(dataset.base_indices[0]))
    image = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(image).save(path, quality=95)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])  # header intact, data cut
    with pytest.raises(DatasetError, match="cannot be decoded"):
        dataset[0]


def test_image_and_label_of_different_sizes(voc_root):
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(_path(voc_root, "label", 3))
    with pytest.raises(DatasetError, match="syn_train_000003.jpg.* is 8x8 but its label .* is 8x9"):
        _build(voc_root)


@pytest.mark.parametrize("value", [21, 254])
def test_voc_label_value_out_of_range(voc_root, value):
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(_path(voc_root, "label", 0))
    with pytest.raises(DatasetError, match=f"syn_train_000000.png.* not voc classes: {value}"):
        _build(voc_root)


def test_invalid_values_found_when_loaded(voc_root):
    dataset = _build(voc_root)
    Image.fromarray(np.full((8, 8), 33, dtype=np.uint8)).save(
        _path(voc_root, "label", int(dataset.base_indices[0]))
    )
    with pytest.raises(DatasetError, match="not voc classes: 33"):
        dataset[0]


def test_rgb_label(voc_root):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(_path(voc_root, "label", 0))
    with pytest.raises(DatasetError, match="mode 'RGB'"):
        _build(voc_root)


@pytest.mark.parametrize("value", [151, 255])
def test_ade_label_value_out_of_range(tmp_path, value):
    bad = item_with_labels([0, 1])
    bad[1][0, 0] = value
    write_ade_layout(
        str(tmp_path / "ADEChallengeData2016"), [item_with_labels([1]), bad], [item_with_labels([1])]
    )
    with pytest.raises(DatasetError, match=f"ADE_train_00000002.png.* not ade classes: {value}"):
        build_dataset("ade", str(tmp_path), "100-50", 0, "train")


def test_errors_from_worker_processes(voc_root):
    Image.fromarray(np.full((8, 8), 99, dtype=np.uint8)).save(_path(voc_root, "label", 3))
    base = splits.read_base_list("voc", voc_root, "train")
    with pytest.raises(DatasetError, match="syn_train_000003.png.* not voc classes: 99") as info:
        splits.scan_presence(base, num_workers=2)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="coco"), "unknown dataset 'coco'"),
        (dict(split="training"), "unknown split 'training'"),
        (dict(task="15-6"), "unknown task '15-6'"),
        (dict(step=2), "step 2 does not exist"),
    ],
)
def test_bad_arguments(voc_root, kwargs, message):
    arguments = dict(name="voc", root=voc_root, task="15-5", step=0, split="train")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_dataset(**arguments)
