"""TensorBoard logging, console progress and the ``logging`` set-up.

The caller enables the ``Logger`` and ``Progress`` on rank 0 only
(``enabled=segmentation.distributed.is_main_process()``), as it does for checkpoint writes; a
disabled one does nothing. The event-file writer is tensorboardX when installed, else
``torch.utils.tensorboard`` (which needs the ``tensorboard`` package), else none: the run goes on
without event files after one warning.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional, TextIO

import numpy as np
import torch

_log = logging.getLogger(__name__)


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


def confusion_matrix_image(matrix: Any, cell_pixels: Optional[int] = None) -> np.ndarray:
    """A CHW uint8 heat map of a confusion matrix (rows: ground truth, columns: prediction).

    Each row is normalised by its total (rows without pixels stay white) and drawn from white (0)
    to dark blue (1); each cell is ``cell_pixels`` wide (default: about 256 pixels in all).
    """
    counts = _to_numpy(matrix).astype(np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    white, dark_blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    colours = white[:, None, None] + (dark_blue - white)[:, None, None] * fraction[None]
    if cell_pixels is None:
        cell_pixels = max(1, 256 // max(1, counts.shape[0]))
    colours = colours.repeat(cell_pixels, axis=1).repeat(cell_pixels, axis=2)
    return colours.round().astype(np.uint8)


class Logger:
    """TensorBoard event files under ``logdir`` (nothing when disabled or ``logdir`` is None)."""

    def __init__(self, logdir: Optional[str], enabled: bool) -> None:
        self._writer = None
        if not enabled or logdir is None:
            return
        writer_class = _summary_writer_class()
        if writer_class is None:
            _log.warning("neither tensorboardX nor tensorboard is installed: no TensorBoard event files "
                         "are written (pip install tensorboardX)")
            return
        self._writer = writer_class(logdir)

    @property
    def writes_events(self) -> bool:
        """Whether this logger writes event files."""
        return self._writer is not None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """Log a CHW image: uint8, or float with values in [0, 1]."""
        if self._writer is not None:
            self._writer.add_image(tag, to_uint8_image(image), step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def confusion_matrix(self, tag: str, matrix: Any, step: int) -> None:
        """Log a confusion matrix as a row-normalised heat-map image."""
        if self._writer is not None:
            self._writer.add_image(tag, confusion_matrix_image(matrix), step, dataformats="CHW")

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
    every ``every`` iterations and at the end. A disabled one prints nothing but still counts.
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
        if self.is_tty:
            self.stream.write("\r" + self.line(**postfix))
            self.stream.flush()
        elif self.done % self.every == 0 or self.done == self.total:
            self.stream.write(self.line(**postfix) + "\n")
            self.stream.flush()
            self._last_printed = self.done

    def close(self) -> None:
        """End the line (terminal) or print the final state if it was not printed (log files)."""
        if not self.enabled:
            return
        if self.is_tty:
            self.stream.write("\n")
        elif self._last_printed != self.done:
            self.stream.write(self.line() + "\n")
            self._last_printed = self.done
        self.stream.flush()


def setup_logging(rank: int) -> None:
    """Configure ``logging``: INFO on rank 0, WARNING on the others, lines prefixed by the rank."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
