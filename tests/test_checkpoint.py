import logging
import os
from pathlib import Path

import pytest
import torch

from segmentation.engine import checkpoint
from segmentation.engine.checkpoint import (
    InStepCheckpoints,
    atomic_save,
    check_step_checkpoint,
    load_checkpoint,
    run_dir,
    step_checkpoint_path,
)


def test_atomic_save_round_trip(tmp_path):
    target = tmp_path / "deep" / "folder" / "model.pth"
    state = {"weights": torch.arange(6.0).view(2, 3), "epoch": 3}
    atomic_save(state, target)
    loaded = load_checkpoint(target)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], state["weights"])
    assert os.listdir(target.parent) == ["model.pth"]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model.pth"
    atomic_save({"version": 1}, target)

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"version": 2}, target)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"version": 2}, tmp_path / "new.pth")
    monkeypatch.undo()
    # The old file is intact, the new one never appeared, and no temporary file is left.
    assert os.listdir(tmp_path) == ["model.pth"]
    assert load_checkpoint(target) == {"version": 1}


def test_paths(tmp_path):
    assert run_dir(tmp_path, "voc", "15-5s", False, "MiB") == tmp_path / "voc-15-5s" / "MiB"
    assert run_dir("ck", "ade", "100-50", True, "x") == Path("ck") / "ade-100-50-ov" / "x"
    assert step_checkpoint_path(tmp_path, 3) == tmp_path / "step3.pth"


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_checkpoint(garbage)
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor_file)
    with pytest.raises(ValueError, match="tensor.pth.*Tensor"):
        load_checkpoint(tensor_file)


def _in_step_state(iteration):
    return {"iteration": iteration, "model_state": {"w": torch.full((3,), float(iteration))}}


def test_in_step_checkpoints_keep_the_last_two(tmp_path):
    checkpoints = InStepCheckpoints(tmp_path, step=1)
    assert checkpoints.latest() is None
    for iteration in (10, 20, 30, 40):
        checkpoints.save(_in_step_state(iteration), iteration)
    assert sorted(os.listdir(tmp_path)) == ["step1-iter30.pth", "step1-iter40.pth"]
    assert checkpoints.latest()["iteration"] == 40
    # Numeric, not lexical, order: iteration 100 is newer than 40.
    checkpoints.save(_in_step_state(100), 100)
    assert sorted(os.listdir(tmp_path)) == ["step1-iter100.pth", "step1-iter40.pth"]
    assert checkpoints.latest()["iteration"] == 100


def test_in_step_checkpoints_of_other_steps_are_left_alone(tmp_path):
    other = InStepCheckpoints(tmp_path, step=11)
    other.save(_in_step_state(5), 5)
    atomic_save({"final": True}, step_checkpoint_path(tmp_path, 1))
    checkpoints = InStepCheckpoints(tmp_path, step=1, keep=1)
    checkpoints.save(_in_step_state(1), 1)
    checkpoints.save(_in_step_state(2), 2)
    assert sorted(os.listdir(tmp_path)) == ["step1-iter2.pth", "step1.pth", "step11-iter5.pth"]
    checkpoints.clear()
    assert sorted(os.listdir(tmp_path)) == ["step1.pth", "step11-iter5.pth"]
    assert checkpoints.latest() is None and other.latest()["iteration"] == 5


def test_latest_skips_a_truncated_newest_file(tmp_path, caplog):
    checkpoints = InStepCheckpoints(tmp_path, step=0)
    checkpoints.save(_in_step_state(7), 7)
    newest = checkpoints.save(_in_step_state(8), 8)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        latest = checkpoints.latest()
    assert latest["iteration"] == 7
    assert "step0-iter8.pth" in caplog.text


def _step_ckpt():
    return {"dataset": "voc", "task": "15-5", "step": 0, "classes": [16], "channel_order": list(range(16)),
            "model_state": {}}


def test_check_step_checkpoint_accepts_a_match():
    check_step_checkpoint(_step_ckpt(), "voc", "15-5", 0, (16,), "run/step0.pth")


def test_a_step_0_model_of_another_task_with_the_same_classes_is_accepted():
    # The 15-5 and 15-1 tasks share step 0: one step-0 model starts both.
    check_step_checkpoint(_step_ckpt(), "voc", "15-1", 0, (16,), "run/step0.pth")


@pytest.mark.parametrize(
    "key, value, expected",
    [("dataset", "ade", "dataset 'ade', expected dataset 'voc'"),
     ("step", 1, "step 1, expected step 0"),
     ("classes", [21], "classes [21], expected classes [16]"),
     ("channel_order", list(range(1, 17)), "expected channel_order [0, 1, 2")],
)
def test_check_step_checkpoint_names_file_and_mismatch(key, value, expected):
    ckpt = _step_ckpt()
    ckpt[key] = value
    with pytest.raises(ValueError) as error:
        check_step_checkpoint(ckpt, "voc", "15-5", 0, [16], "run/step0.pth")
    assert "run/step0.pth" in str(error.value) and expected in str(error.value)


def test_same_layout_but_other_classes_is_refused():
    # 19-1 and 19-1b both start with 20 channels, but 19-1b's step 0 lacks bottle (5) and has tv (20).
    ckpt = dict(_step_ckpt(), task="19-1", classes=[20], channel_order=list(range(20)))
    with pytest.raises(ValueError, match="task '19-1'.*channel_order.*of task '19-1b'"):
        check_step_checkpoint(ckpt, "voc", "19-1b", 0, [20], "run/step0.pth")


def test_check_step_checkpoint_without_metadata():
    with pytest.raises(ValueError, match="old.pth.*'dataset'"):
        check_step_checkpoint({"model_state": {}}, "voc", "15-5", 0, [16], "old.pth")
