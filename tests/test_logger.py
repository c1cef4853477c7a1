import io
import logging
import struct
import sys
import types

import numpy as np
import pytest
import torch

from segmentation.engine import logger as logger_module
from segmentation.engine.logger import (
    Logger,
    Progress,
    RunLog,
    confusion_matrix_figure,
    figure_image,
    setup_logging,
    to_uint8_image,
)


def _summaries(events):
    """(tag, kind, value) of every summary value of ``events``."""
    found = []
    for event in events:
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            found.append((value.tag, kind, value.simple_value if kind == "simple_value" else None))
    return found


def _read_tensorboardx_events(logdir):
    """The summaries of the event files that tensorboardX wrote in ``logdir``, parsed with its own protos."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return _summaries(events)


def _read_tensorboard_events(logdir):
    """The summaries of the event files that torch.utils.tensorboard wrote in ``logdir``, read by
    the tensorboard package it needs (its reader, without converting the summaries)."""
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        events.extend(loader.LegacyEventFileLoader(str(path)).Load())
    return _summaries(events)


def _log_everything(log):
    log.scalar("Loss/0", 0.5, 3)
    log.image("Sample/0", torch.rand(3, 8, 8), 1)
    log.image("Sample_uint8/0", torch.zeros(3, 4, 4, dtype=torch.uint8), 1)
    log.text("Opts/0", "lr: 0.01", 0)
    log.confusion_matrix("Confusion/0", np.array([[3, 1], [0, 2]]), ["a", "b"], 0)
    log.close()


def test_writes_event_files_with_tensorboardx(tmp_path):
    pytest.importorskip("tensorboardX")
    log = Logger(str(tmp_path), enabled=True)
    assert log.writes_events
    _log_everything(log)
    events = _read_tensorboardx_events(tmp_path)
    assert ("Loss/0", "simple_value", 0.5) in events
    kinds = {tag: kind for tag, kind, _ in events}
    assert kinds["Sample/0"] == "image" and kinds["Sample_uint8/0"] == "image"
    assert kinds["Confusion/0"] == "image"
    assert any(tag.startswith("Opts/0") for tag in kinds)


class _RecordingWriter:
    instances = []

    def __init__(self, logdir, **options):
        self.logdir = logdir
        self.options = options
        self.calls = []
        _RecordingWriter.instances.append(self)

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_falls_back_to_torch_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes `import tensorboardX` fail
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _RecordingWriter.instances.clear()
    log = Logger(str(tmp_path), enabled=True)
    assert log.writes_events
    _log_everything(log)
    (writer,) = _RecordingWriter.instances
    assert writer.logdir == str(tmp_path) and writer.options == {"filename_suffix": ""}
    names = [name for name, _, _ in writer.calls]
    assert names == ["add_scalar", "add_image", "add_image", "add_text", "add_image", "close"]
    assert writer.calls[0][1] == ("Loss/0", 0.5, 3)
    image = writer.calls[1][1][1]
    assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
    figure = writer.calls[4][1][1]
    assert figure.dtype == np.uint8 and figure.shape == (3, 550, 650)  # 3 x 100 dpi plus 2.5 and 3.5 inches


def test_real_torch_tensorboard_when_installed(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    log = Logger(str(tmp_path), enabled=True)
    assert log.writes_events
    _log_everything(log)
    events = _read_tensorboard_events(tmp_path)  # tensorboardX still hidden: the reader needs only tensorboard
    assert ("Loss/0", "simple_value", 0.5) in events
    kinds = {tag: kind for tag, kind, _ in events}
    assert kinds["Sample/0"] == "image" and kinds["Sample_uint8/0"] == "image" and kinds["Confusion/0"] == "image"


def test_without_any_tensorboard_warns_once_and_writes_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.WARNING):
        log = Logger(str(tmp_path / "logs"), enabled=True)
        _log_everything(log)
    assert not log.writes_events
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensorboard" in warnings[0].getMessage()
    assert not (tmp_path / "logs").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    log = Logger(str(tmp_path / "logs"), enabled=False)
    assert not log.writes_events
    _log_everything(log)
    assert list(tmp_path.iterdir()) == []
    no_dir = Logger(None, enabled=True)
    assert not no_dir.writes_events
    _log_everything(no_dir)


def test_to_uint8_image():
    image = torch.tensor([[[0.0, 0.5], [1.0, 2.0]], [[-1.0, 0.25], [0.1, 0.0]], [[0.0] * 2] * 2])
    expected = np.array([[[0, 128], [255, 255]], [[0, 64], [26, 0]], [[0, 0], [0, 0]]], dtype=np.uint8)
    assert np.array_equal(to_uint8_image(image), expected)
    uint8 = np.full((1, 2, 2), 7, dtype=np.uint8)
    assert to_uint8_image(uint8) is uint8
    with pytest.raises(ValueError, match="CHW"):
        to_uint8_image(np.zeros((4, 4)))


def test_confusion_matrix_figure_names_both_axes_and_normalises_the_rows():
    names = ["background", "solid disc", "striped cross"]
    figure = confusion_matrix_figure(torch.tensor([[3, 1, 0], [0, 0, 0], [0, 2, 2]]), names)
    matrix_axes, colour_bar = figure.axes
    assert [label.get_text() for label in matrix_axes.get_xticklabels()] == names
    assert [label.get_text() for label in matrix_axes.get_yticklabels()] == names
    assert (matrix_axes.get_xlabel(), matrix_axes.get_ylabel()) == ("prediction", "ground truth")
    assert "fraction" in colour_bar.get_ylabel()
    shown = matrix_axes.images[0].get_array()
    assert np.allclose(shown[0], [0.75, 0.25, 0.0]) and np.allclose(shown[2], [0.0, 0.5, 0.5])
    assert shown.mask[1].all()  # no pixel of the class: drawn grey, not as zeros
    image = figure_image(figure)
    assert image.dtype == np.uint8 and image.shape == (3, 550, 650)
    assert (image == 204).all(axis=0).any()  # the grey row
    with pytest.raises(ValueError, match="square"):
        confusion_matrix_figure(np.zeros((2, 3)), names[:2])
    with pytest.raises(ValueError, match="3 class names for a 2x2"):
        confusion_matrix_figure(np.zeros((2, 2)), names)


def test_without_matplotlib_the_confusion_matrix_is_left_out_after_one_warning(tmp_path, monkeypatch, caplog):
    pytest.importorskip("tensorboardX")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    logger_module._matplotlib_available.cache_clear()
    try:
        log = Logger(str(tmp_path), enabled=True)
        with caplog.at_level(logging.WARNING):
            _log_everything(log)
            again = Logger(str(tmp_path / "again"), enabled=True)
            again.confusion_matrix("Confusion/1", np.eye(2), ["a", "b"], 0)
            again.close()
    finally:
        logger_module._matplotlib_available.cache_clear()
    assert [record.getMessage() for record in caplog.records if "matplotlib" in record.getMessage()] == [
        "matplotlib is not installed: the confusion matrices are not written to TensorBoard (pip install matplotlib)"]
    tags = {tag for tag, _, _ in _read_tensorboardx_events(tmp_path)}
    assert "Loss/0" in tags and not any(tag.startswith("Confusion") for tag in tags)


def test_tags_keep_only_the_characters_tensorboard_allows(tmp_path, caplog):
    pytest.importorskip("tensorboardX")
    log = Logger(str(tmp_path), enabled=True)
    with caplog.at_level(logging.INFO):
        log.scalar("val/class_iou/solid disc", 0.5, 1)
        log.close()
    assert ("val/class_iou/solid_disc", "simple_value", 0.5) in _read_tensorboardx_events(tmp_path)
    assert not caplog.records  # the writer had nothing to replace, so nothing to report


def test_file_suffix_replaces_the_earlier_event_file_of_the_same_suffix(tmp_path):
    pytest.importorskip("tensorboardX")
    for value, suffix in ((1.0, ".step1"), (2.0, ".step11"), (3.0, ".step1")):
        log = Logger(str(tmp_path), enabled=True, file_suffix=suffix)
        log.scalar("test/miou_all", value, int(suffix[5:]))
        log.close()
    files = sorted(path.name for path in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".step1") and files[1].endswith(".step11")
    assert sorted(_read_tensorboardx_events(tmp_path), key=lambda event: event[2]) == [
        ("test/miou_all", "simple_value", 2.0), ("test/miou_all", "simple_value", 3.0)]


class _FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_progress_plain_lines(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(logger_module, "time", clock)
    stream = io.StringIO()
    progress = Progress(total=5, desc="step 1 epoch 2", enabled=True, every=2, stream=stream)
    for _ in range(5):
        clock.now += 2.0
        progress.update(8, loss=0.123456, lr=0.01)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # iterations 2, 4 and 5
    # After 2 iterations: 16 images in 4 s, 3 iterations left at 2 s each.
    assert lines[0] == "step 1 epoch 2 2/5  40% | 4.0 img/s | 0:00:04<0:00:06 | loss=0.1235 lr=0.01"
    assert lines[2].startswith("step 1 epoch 2 5/5 100% | 4.0 img/s | 0:00:10<0:00:00")
    assert progress.elapsed == 10.0 and progress.images_per_second == 4.0


def test_progress_close_prints_the_unprinted_end():
    stream = io.StringIO()
    progress = Progress(total=10, desc="val", enabled=True, every=4, stream=stream)
    for _ in range(5):
        progress.update(1)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["val 4/10  40%", "val 5/10  50%"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_redraws_one_line():
    stream = _Terminal()
    progress = Progress(total=3, desc="train", enabled=True, every=100, stream=stream)
    for _ in range(3):
        progress.update(2)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "train 3/3 100%" in text


def test_disabled_progress_prints_nothing_but_counts():
    stream = io.StringIO()
    progress = Progress(total=3, desc="train", enabled=False, every=1, stream=stream)
    progress.update(4)
    progress.close()
    assert stream.getvalue() == "" and progress.images == 4 and progress.done == 1


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def test_setup_logging_levels_and_prefix(restore_root_logger, capsys):
    setup_logging(1)
    logging.getLogger("segmentation.test").info("hidden")
    logging.getLogger("segmentation.test").warning("shown")
    setup_logging(0)
    logging.getLogger("segmentation.test").info("info on rank 0")
    out = capsys.readouterr().out
    assert "hidden" not in out
    assert "rank1 WARNING segmentation.test: shown" in out
    assert "rank0 INFO segmentation.test: info on rank 0" in out


def test_run_log_appends_the_console_lines_and_the_progress_lines(tmp_path, restore_root_logger, capsys):
    setup_logging(0)
    log = logging.getLogger("segmentation.test")
    path = tmp_path / "train.log"
    path.write_text("an earlier launch\n")
    run_log = RunLog(path)
    log.info("step 0: validation on 12 images")
    plain = Progress(total=3, desc="step 0", enabled=True, every=2, stream=io.StringIO())
    terminal = Progress(total=2, desc="step 1", enabled=True, every=1, stream=_Terminal())
    for progress in (plain, terminal):
        for _ in range(progress.total):
            progress.update(4)
        progress.close()
    run_log.write(log, logging.ERROR, "the run failed")  # printed by the caller
    run_log.close()
    run_log.close()  # again: nothing
    log.info("after the run")
    console = capsys.readouterr().out.splitlines()
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and lines[0] == "an earlier launch"
    assert lines[1] == console[0]
    assert lines[1].endswith(" rank0 INFO segmentation.test: step 0: validation on 12 images")
    # The plain lines of both progresses, on a terminal too (which redraws one line instead).
    assert [line.split(" INFO segmentation.progress: ")[1].split(" | ")[0] for line in lines[2:6]] == [
        "step 0 2/3  67%", "step 0 3/3 100%", "step 1 1/2  50%", "step 1 2/2 100%"]
    assert lines[6].endswith(" rank0 ERROR segmentation.test: the run failed")
    assert console[1:] == [console[-1]] and console[-1].endswith("after the run")
