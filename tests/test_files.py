import json
import os

import pytest

from segmentation.files import atomic_write, current_umask


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


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "results.json", lambda handle: handle.write("{}"), "w")
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == mode


def test_current_umask_reads_without_changing_it():
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)
