"""TensorBoard logging, console progress, the ``logging`` set-up and the run's log file.

The ``Logger`` and the ``RunLog`` are enabled and opened on rank 0 only (by
``segmentation.engine.run_files.RunFiles``, which also writes the checkpoints there), the
``Progress`` lines by the trainer on rank 0; a disabled one does nothing. The event-file writer is tensorboardX when installed, else
``torch.utils.tensorboard`` (which needs the ``tensorboard`` package), else none: the run goes on
without event files after one warning. matplotlib draws the confusion matrices (without it they
are left out, after one warning).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, TextIO

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_log = logging.getLogger(__name__)

# The progress lines also go to this logger, whose only handler is the run's log file (``RunLog``):
# the console gets them from ``Progress`` itself.
_progress_log = logging.getLogger("segmentation.progress")
_progress_log.propagate = False

_LOG_FORMAT = "%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
_LOG_DATE_FORMAT = "%H:%M:%S"


def _summary_writer_class() -> Optional[type]:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter


def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def to_uint8_image(image: Any) -> np.ndarray:
    """CHW uint8 array from a CHW uint8 image or a float image with values in [0, 1]."""
    image = _to_numpy(image)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a CHW image with 1 or 3 channels, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    return (np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)


@functools.lru_cache(maxsize=None)  # one warning per process
def _matplotlib_available() -> bool:
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    _log.warning("matplotlib is not installed: the confusion matrices are not written to TensorBoard "
                 "(pip install matplotlib)")
    return False


def confusion_matrix_figure(matrix: Any, class_names: Sequence[str]) -> Figure:
    """A matplotlib figure of a confusion matrix: rows ground truth, columns prediction, both
    labelled with ``class_names``; each row normalised by its pixels (grey: a class without
    pixels); a colour bar. It is drawn on the Agg canvas (``figure_image``)."""
    # Imported here, with the Agg canvas (no display): importing this module stays cheap.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = _to_numpy(matrix).astype(np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {counts.shape}")
    size = counts.shape[0]
    if len(class_names) != size:
        raise ValueError(f"{len(class_names)} class names for a {size}x{size} confusion matrix")
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    # About 0.22 inch per class, at most 16 inches (ADE's 151 classes), the labels as large as fits.
    side = min(16.0, max(3.0, 0.22 * size))
    font_size = min(8.0, 0.7 * side * 72 / size)
    figure = Figure(figsize=(side + 3.5, side + 2.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # becomes figure.canvas
    axes = figure.add_subplot()
    colours = matplotlib.colormaps["Blues"].with_extremes(bad="0.8")
    shown = axes.imshow(fraction, cmap=colours, vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = np.arange(size)
    axes.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=font_size)
    axes.set_yticks(ticks, labels=list(class_names), fontsize=font_size)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    figure.colorbar(shown, ax=axes, shrink=0.8, label="fraction of the row's ground-truth pixels (grey: none)")
    return figure


def figure_image(figure: Figure) -> np.ndarray:
    """A figure on the Agg canvas drawn as a CHW uint8 RGB image."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].transpose(2, 0, 1).copy()


def _tag(tag: str) -> str:
    # TensorBoard tags keep only these characters; the writers would replace the others
    # themselves, logging a line each time.
    return re.sub(r"[^-/\w.]", "_", tag)


class Logger:
    """TensorBoard event files under ``logdir`` (nothing when disabled or ``logdir`` is None).

    With ``file_suffix`` the event file's name ends with it, and the event files of ``logdir``
    whose names end with it are removed first: a logger per step with the step as suffix keeps
    one file per step in a folder shared by the steps, replaced when the step is logged again.
    """

    def __init__(self, logdir: Optional[str], enabled: bool, file_suffix: str = "") -> None:
        self._writer = None
        if not enabled or logdir is None:
            return
        writer_class = _summary_writer_class()
        if writer_class is None:
            _log.warning("neither tensorboardX nor tensorboard is installed: no TensorBoard event files "
                         "are written (pip install tensorboardX)")
            return
        if file_suffix:
            for earlier in Path(logdir).glob(f"events.out.tfevents.*{file_suffix}"):
                earlier.unlink()
        self._writer = writer_class(logdir, filename_suffix=file_suffix)

    @property
    def writes_events(self) -> bool:
        """Whether this logger writes event files."""
        return self._writer is not None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(_tag(tag), float(value), step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """Log a CHW image: uint8, or float with values in [0, 1]."""
        if self._writer is not None:
            self._writer.add_image(_tag(tag), to_uint8_image(image), step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(_tag(tag), text, step)

    def confusion_matrix(self, tag: str, matrix: Any, class_names: Sequence[str], step: int) -> None:
        """Log a confusion matrix as a labelled figure (``confusion_matrix_figure``)."""
        if self._writer is not None and _matplotlib_available():
            image = figure_image(confusion_matrix_figure(matrix, class_names))
            self._writer.add_image(_tag(tag), image, step, dataformats="CHW")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of ``total`` iterations: done/total, images/s and ETA, plus caller values.

    On a terminal it redraws one line; otherwise (log files, SLURM output) it prints a plain line
    every ``every`` iterations and at the end. These plain lines also go to the run's log file
    (``RunLog``), on a terminal too. A disabled one prints nothing but still counts.
    """

    def __init__(self, total: int, desc: str, enabled: bool, every: int = 10,
                 stream: Optional[TextIO] = None) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.every = max(1, every)
        self.stream = sys.stdout if stream is None else stream
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.images = 0
        self._start = time.perf_counter()
        self._last_printed = 0

    @property
    def elapsed(self) -> float:
        """Seconds since the progress started."""
        return time.perf_counter() - self._start

    @property
    def images_per_second(self) -> float:
        elapsed = self.elapsed
        return self.images / elapsed if elapsed > 0 else 0.0

    def line(self, **postfix: Any) -> str:
        """The status line: ``desc done/total pct | images/s | elapsed<ETA | key=value ...``."""
        elapsed = self.elapsed
        remaining = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc} {self.done}/{self.total} {percent:3.0f}%",
                 f"{self.images_per_second:.1f} img/s",
                 f"{_format_duration(elapsed)}<{_format_duration(remaining)}"]
        values = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                          for key, value in postfix.items())
        if values:
            parts.append(values)
        return " | ".join(parts)

    def update(self, n_images: int, **postfix: Any) -> None:
        """One iteration processed ``n_images`` images; ``postfix`` values (e.g. loss) are shown."""
        self.done += 1
        self.images += n_images
        if not self.enabled:
            return
        line = self.line(**postfix)
        if self.is_tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        if self.done % self.every == 0 or self.done == self.total:
            self._plain_line(line)

    def close(self) -> None:
        """End the line (terminal) and print the final state if it was not printed."""
        if not self.enabled:
            return
        if self.is_tty:
            self.stream.write("\n")
        if self._last_printed != self.done:
            self._plain_line(self.line())
        self.stream.flush()

    def _plain_line(self, line: str) -> None:
        if not self.is_tty:  # a terminal shows it redrawn
            self.stream.write(line + "\n")
            self.stream.flush()
        _progress_log.info("%s", line)
        self._last_printed = self.done


def _formatter(rank: int) -> logging.Formatter:
    return logging.Formatter(_LOG_FORMAT.format(rank=rank), datefmt=_LOG_DATE_FORMAT)


def setup_logging(rank: int) -> None:
    """Configure ``logging``: INFO on rank 0, WARNING on the others, lines prefixed by the rank."""
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_formatter(rank))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[console], force=True)


class RunLog:
    """The run's log file at ``path``, appended to: the lines ``logging`` prints (in the console's
    format) and the progress lines, until ``close``. Opened on rank 0 only."""

    def __init__(self, path: Path) -> None:
        self._handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        self._handler.setFormatter(_formatter(0))
        logging.getLogger().addHandler(self._handler)
        _progress_log.addHandler(self._handler)

    def write(self, logger: logging.Logger, level: int, message: str) -> None:
        """A line of ``logger`` for this file only: for what the caller prints on the console
        without ``logging`` (the error that ends the run)."""
        self._handler.handle(logger.makeRecord(logger.name, level, "", 0, message, None, None))

    def close(self) -> None:
        """Stop writing and close the file (again: nothing)."""
        logging.getLogger().removeHandler(self._handler)
        _progress_log.removeHandler(self._handler)
        self._handler.close()
