import json
import os

import pytest

from segmentation.files import atomic_write


def test_atomic_write_text_round_trip(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write(target, lambda handle: json.dump({"miou": 0.5}, handle), "w")
    assert json.loads(target.read_text()) == {"miou": 0.5}
    assert os.listdir(target.parent) == ["results.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write(target, lambda handle: handle.write("old"), "w")

    def broken(handle):
        handle.write("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken, "w")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]
