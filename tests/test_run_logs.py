"""What a run shows its user, read back: ``train.log`` (the console's lines, appended by every
launch) and the TensorBoard events (per-step training and validation folders, one test folder
for the whole run), from the shared MiB run and from a ``--test`` run on a copy of it."""
import json
import logging

import pytest

from conftest import copy_run, mib_run_args
from segmentation.data import CLASS_NAMES, build_dataset
from segmentation.engine import run
from segmentation.engine.logger import confusion_matrix_figure, figure_image
from segmentation.engine.trainer import TrainingInterrupted
from train_cli_worker import run_train_in_process, train_args

PROGRESS = " rank0 INFO segmentation.progress: "
TEST_SCALARS = ("miou_all", "miou_old", "miou_new", "miou_all_fg", "miou_old_fg", "miou_new_fg", "overall_acc")


def _logs(out):
    return out / "logs" / "synthetic-15-5" / "run"


def _events(folder):
    """tensorboard's reader of the event files in ``folder``, everything loaded."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    everything = {kind: 0 for kind in (event_accumulator.SCALARS, event_accumulator.IMAGES, event_accumulator.TENSORS)}
    events = event_accumulator.EventAccumulator(str(folder), size_guidance=everything)
    events.Reload()
    return events


def _scalars(events, tag):
    return {event.step: event.value for event in events.Scalars(tag)}


def _figure_size(num_classes):
    """(width, height) of the confusion-matrix figure of ``num_classes`` classes."""
    _, height, width = figure_image(confusion_matrix_figure([[0] * num_classes] * num_classes,
                                                            ["x"] * num_classes)).shape
    return width, height


def _tag_name(name):
    return name.replace(" ", "_")


def test_train_log_has_the_run_lines_progress_and_evaluation_sets(mib_run, data_root):
    lines = (_logs(mib_run) / "train.log").read_text().splitlines()
    assert lines[0].endswith(" rank0 INFO segmentation.engine.run: synthetic 15-5, steps [0, 1], method MiB, "
                             "device cpu, 1 process(es)")
    text = "\n".join(lines)
    for step, seen, relation in ((0, 15, "the validation images are the test images"),
                                 (1, 20, "every validation image is also a test image")):
        val = build_dataset("synthetic", data_root, "15-5", step, "val")
        test = build_dataset("synthetic", data_root, "15-5", step, "test")
        step_classes = (15, 5)[step]
        assert (f"step {step}: validation on {len(val)} images of the 'val' list that show one of this step's "
                f"{step_classes} classes, scored on these classes and the background (the other classes "
                f"ignored); test on {len(test)} images of the 'val' list that show one of the {seen} classes "
                f"seen so far, scored on all of them and the background; {relation}") in text
        assert f"step {step} test (" in text and f", {len(test)} images): mIoU all " in text
        assert f"step {step} results written to " in text
        # --print_interval 1: a progress line per iteration, the last one at 100%.
        progress = [line.split(PROGRESS)[1] for line in lines if PROGRESS + f"step {step} " in line]
        iterations = int(progress[0].split()[2].split("/")[1])
        assert [line.split()[2] for line in progress] == [f"{i}/{iterations}" for i in range(1, iterations + 1)]
    assert all(line[:8].count(":") == 2 and " rank0 " in line for line in lines)


def test_step_folders_have_validation_scores_figures_and_samples(mib_run):
    logs = _logs(mib_run)
    for step, num_classes in ((0, 16), (1, 21)):
        events = _events(logs / f"step{step}")
        tags = events.Tags()
        results = json.loads((logs / f"step{step}.json").read_text())
        class_tags = {f"val/class_iou/{_tag_name(name)}" for name in results["class_names"]}
        validated = {tag for tag in tags["scalars"] if tag.startswith("val/class_iou/")}
        assert validated and validated <= class_tags and "val/class_iou/background" in validated
        assert all(set(_scalars(events, tag)) == {1} for tag in validated)  # epoch 1
        assert set(_scalars(events, "val/miou")) == {1}
        assert sorted(tags["images"]) == ["val/confusion_matrix", "val/sample_0"]  # --sample_num 1
        (figure,) = events.Images("val/confusion_matrix")
        assert (figure.step, figure.width, figure.height) == (1, *_figure_size(num_classes))
        (sample,) = events.Images("val/sample_0")
        assert (sample.width, sample.height) == (3 * 48, 48)  # image | ground truth | prediction
        assert not any(tag.startswith("test/") for tag in tags["scalars"] + tags["images"])


def test_one_test_folder_draws_the_test_scores_over_the_steps(mib_run):
    logs = _logs(mib_run)
    assert sorted(path.name.rsplit(".", 1)[1] for path in (logs / "test").iterdir()) == ["step0", "step1"]
    events = _events(logs / "test")
    results = [json.loads((logs / f"step{step}.json").read_text()) for step in (0, 1)]
    for key in TEST_SCALARS:
        expected = {step: result[key] for step, result in enumerate(results) if result[key] is not None}
        assert _scalars(events, f"test/{key}") == pytest.approx(expected), key
    assert set(_scalars(events, "test/miou_new")) == {1}  # no new classes at step 0
    for name, iou in zip(results[1]["class_names"], results[1]["class_iou"]):
        assert _scalars(events, f"test/class_iou/{_tag_name(name)}")[1] == pytest.approx(iou), name
    assert _scalars(events, "test/class_iou/solid_disc") == pytest.approx(
        {0: results[0]["class_iou"][1], 1: results[1]["class_iou"][1]})
    figures = events.Images("test/confusion_matrix")
    assert [(figure.step, figure.width, figure.height) for figure in figures] == [
        (0, *_figure_size(16)), (1, *_figure_size(21))]
    assert [sample.step for sample in events.Images("test/sample_0")] == [0, 1]
    assert sorted(events.Tags()["images"]) == ["test/confusion_matrix", "test/sample_0"]


def test_test_mode_writes_its_samples_and_adds_the_console_lines_to_train_log(mib_run, data_root, tmp_path):
    out = copy_run(mib_run, tmp_path)
    logs = _logs(out)
    before = (logs / "train.log").read_text()
    args = mib_run_args(data_root, out)
    args[args.index("--step") + 1] = "1"
    args[args.index("--sample_num") + 1] = "2"
    result = run_train_in_process([*args, "--test"])
    trained = json.loads((logs / "step1.json").read_text())
    tested = json.loads((logs / "eval-step1.json").read_text())
    for key in ("class_iou", "miou_all", "miou_old", "miou_new", "overall_acc", "mean_acc"):
        assert tested[key] == trained[key]

    log = (logs / "train.log").read_text()
    assert log.startswith(before) and log.endswith(result.stdout)  # appended: exactly what the console showed
    assert f"step 1 results written to {logs / 'eval-step1.json'}" in result.stdout

    # Its own event folder, beside the training's test folder, which it leaves alone.
    assert sorted(path.name for path in (logs / "test").iterdir()) == sorted(
        path.name for path in (_logs(mib_run) / "test").iterdir())
    events = _events(logs / "eval")
    assert _scalars(events, "test/miou_all") == {1: pytest.approx(tested["miou_all"])}
    assert sorted(events.Tags()["images"]) == ["test/confusion_matrix", "test/sample_0", "test/sample_1"]
    for tag in ("test/sample_0", "test/sample_1"):
        (sample,) = events.Images(tag)
        assert (sample.step, sample.width, sample.height) == (1, 3 * 48, 48)
    (figure,) = events.Images("test/confusion_matrix")
    assert (figure.width, figure.height) == _figure_size(len(CLASS_NAMES["synthetic"]))


def test_failed_checks_leave_train_log_alone_and_a_failed_run_ends_it_with_the_error(mib_run, data_root, tmp_path):
    out = copy_run(mib_run, tmp_path)
    train_log = _logs(out) / "train.log"
    before = train_log.read_bytes()
    refused = run_train_in_process([*mib_run_args(data_root, out), "--weight_decay", "0.001"], check=False)
    assert refused.returncode == 2 and "--weight_decay" in refused.stderr
    assert train_log.read_bytes() == before

    step1 = out / "checkpoints" / "synthetic-15-5" / "run" / "step1.pth"
    step1.write_bytes(b"\0" * 4096)
    (_logs(out) / "step1.json").unlink()
    failed = run_train_in_process(mib_run_args(data_root, out), check=False)
    assert failed.returncode == 1
    message = failed.stderr.split("train.py: error: ", 1)[1].strip()
    assert message.startswith(f"cannot read checkpoint {step1}")
    log = train_log.read_text()
    assert log.startswith(before.decode()) and "step 0 already finished" in log
    assert log.splitlines()[-1].endswith(f" rank0 ERROR segmentation.engine.run: CheckpointError: {message}")


def test_a_stopped_run_ends_train_log_with_the_stop_and_keeps_it(data_root, tmp_path, monkeypatch):
    def stopped(self, stop_signal):
        raise TrainingInterrupted(self.step, 4)

    monkeypatch.setattr(run.StepRunner, "run", stopped)
    result = run_train_in_process(train_args(data_root, tmp_path, "--step", "0", "--method", "FT"), check=False)
    assert result.returncode == 3
    train_log = _logs(tmp_path) / "train.log"
    lines = train_log.read_text().splitlines()
    assert lines[0].endswith(" rank0 INFO segmentation.engine.run: synthetic 15-5, steps [0], method FT, "
                             "device cpu, 1 process(es)")
    assert lines[-1].endswith(" rank0 WARNING segmentation.engine.run: training of step 0 stopped by a signal "
                              "after iteration 4; an in-step checkpoint was written, rerun the same command to resume")
    handlers = logging.getLogger().handlers + logging.getLogger("segmentation.progress").handlers
    assert str(train_log) not in [getattr(handler, "baseFilename", None) for handler in handlers]
