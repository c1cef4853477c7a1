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
    confusion_matrix_image,
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
    log.confusion_matrix("Confusion/0", np.array([[3, 1], [0, 2]]), 0)
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

    def __init__(self, logdir):
        self.logdir = logdir
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
    assert writer.logdir == str(tmp_path)
    names = [name for name, _, _ in writer.calls]
    assert names == ["add_scalar", "add_image", "add_image", "add_text", "add_image", "close"]
    assert writer.calls[0][1] == ("Loss/0", 0.5, 3)
    image = writer.calls[1][1][1]
    assert image.dtype == np.uint8 and image.shape == (3, 8, 8)


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


def test_confusion_matrix_image():
    image = confusion_matrix_image(np.array([[3, 1], [0, 0]]), cell_pixels=2)
    assert image.shape == (3, 4, 4) and image.dtype == np.uint8
    # Row 0: fractions 0.75 and 0.25 between white (255) and dark blue (8, 48, 107); row 1 is empty.
    white, blue = np.array([255, 255, 255]), np.array([8, 48, 107])
    assert np.array_equal(image[:, 0, 0], np.round(white + 0.75 * (blue - white)))
    assert np.array_equal(image[:, 1, 3], np.round(white + 0.25 * (blue - white)))
    assert np.array_equal(image[:, 3, 0], white) and np.array_equal(image[:, 2, 3], white)
    assert confusion_matrix_image(torch.eye(16)).shape == (3, 256, 256)
    with pytest.raises(ValueError, match="square"):
        confusion_matrix_image(np.zeros((2, 3)))


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
