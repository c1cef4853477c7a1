"""Synthetic VOC-like dataset: a small, deterministic stand-in for Pascal VOC 2012.

``--dataset synthetic`` reads ``<data_root>/SyntheticVOC``, which :func:`ensure_synthetic_voc`
writes on first use. The folder has exactly the Pascal VOC + SBD layout the VOC reader expects::

    SyntheticVOC/
        JPEGImages/syn_train_000000.jpg ...      RGB JPEG images (quality 90)
        SegmentationClassAug/syn_train_000000.png palette PNG labels: 0 background, 1-20, 255 void
        splits/train_aug.txt, splits/val.txt      lines "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
        .generated.json                           parameters; written last (marks a finished run)

Classes. 20 foreground classes, class ``c`` (1..20) = shape ``(c-1) % 5`` (disc, square,
triangle, diamond, cross) x texture ``(c-1) // 5`` (solid, striped, checked, dotted), drawn in a
saturated colour of its own (20 hues spread around the colour wheel, with a little per-object
jitter). Any one of shape, texture or colour identifies the class, so a small network at 64-96 px
crops learns them in minutes. ``CLASS_NAMES["synthetic"]`` names them ("striped disc", ...).

Images. A smooth background gradient in muted colours, 3-8 muted clutter blobs and pixel noise,
then 1-3 objects. Image ``i`` of a split has the *primary* class ``i % 20 + 1`` (so every class
has the same number of images) drawn last, on top. Every third round of 20 images holds the
primary object alone; the others add 0-2 companions drawn from the primary's co-occurring
classes ``c-10, c-5, c-1, c+1, c+5, c+10`` (like person/horse in VOC), so old classes appear in the images
of later incremental steps. Images holding a class alone (or only with lower classes) make every
disjoint step of every VOC task (15-5, 15-1, 19-1, 10-1, ...) non-empty. As in VOC, a void band
(255) of about ``min(width, height) / 80`` pixels (at least 1) surrounds every object.

Determinism. Image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i])``:
the same parameters always give the same files. Generation is idempotent: a finished folder
(marker present with the same parameters) is left alone; an interrupted one (no marker) is wiped
and redone. The defaults (600 train / 150 val images of 128x96) take a few seconds to write.

:func:`generate_synthetic_ade` writes a tiny ADE20K-layout tree (150 classes, no void) for tests
of the ADE reader; :func:`write_voc_layout` / :func:`write_ade_layout` write given arrays, e.g.
from :func:`item_with_labels`, to build hand-made trees with known answers.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..files import atomic_write
from .palette import color_palette

SHAPES = ("disc", "square", "triangle", "diamond", "cross")
TEXTURES = ("solid", "striped", "checked", "dotted")
NUM_CLASSES = len(SHAPES) * len(TEXTURES)  # foreground classes 1..20
MARKER = ".generated.json"
DIR_NAME = "SyntheticVOC"

Item = Tuple[np.ndarray, np.ndarray]  # (image (H, W, 3) uint8, label (H, W) uint8)


def class_descriptions() -> List[str]:
    """Names of the foreground classes 1..20, e.g. "striped disc"."""
    return [f"{TEXTURES[(c - 1) // len(SHAPES)]} {SHAPES[(c - 1) % len(SHAPES)]}" for c in range(1, 21)]


def _class_colour(label: int, num_classes: int) -> np.ndarray:
    # Step through the hues by a stride co-prime with the class count so that classes with
    # neighbouring ids get far-apart hues.
    stride = 7 if num_classes % 7 else 11
    hue = ((label - 1) * stride % num_classes) / num_classes
    value = 0.95 if label % 2 else 0.75
    return np.array(colorsys.hsv_to_rgb(hue, 0.9, value)) * 255.0


def _shape_mask(
    shape: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    if shape == 0:  # disc
        return dx * dx + dy * dy <= 1.0
    if shape == 1:  # square
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if shape == 2:  # triangle, apex up
        return (dy >= -1.0) & (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) / 2.0)
    if shape == 3:  # diamond
        return np.abs(dx) + np.abs(dy) <= 1.0
    # cross
    return ((np.abs(dx) <= 0.33) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.33) & (np.abs(dx) <= 1.0))


def _texture(texture: int, yy: np.ndarray, xx: np.ndarray, period: int, phase: int) -> np.ndarray:
    """Brightness factor in (0, 1] of a texture."""
    if texture == 0:  # solid
        return np.ones_like(yy, dtype=np.float64)
    if texture == 1:  # diagonal stripes
        return np.where(((xx + yy + phase) // (period // 2)) % 2 == 0, 1.0, 0.5)
    if texture == 2:  # checker board
        return np.where(((xx // period) + (yy // period) + phase) % 2 == 0, 1.0, 0.55)
    dots = ((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period - period / 2) ** 2
    return np.where(dots <= (period / 3.5) ** 2, 0.45, 1.0)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square."""
    padded = np.pad(mask, radius)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for oy in range(2 * radius + 1):
        for ox in range(2 * radius + 1):
            out |= padded[oy : oy + height, ox : ox + width]
    return out


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)

    def muted() -> np.ndarray:  # low saturation: never mistaken for a class colour
        return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.8))) * 255

    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1.0) / 2.0
    image = muted() * (1 - ramp[..., None]) + muted() * ramp[..., None]
    for _ in range(rng.integers(3, 9)):  # clutter blobs
        blob = _shape_mask(
            int(rng.integers(0, len(SHAPES))),
            yy,
            xx,
            rng.uniform(0, height),
            rng.uniform(0, width),
            rng.uniform(0.05, 0.25) * height,
            rng.uniform(0.05, 0.25) * width,
        )
        image[blob] = muted()
    return image


def _draw_objects(
    rng: np.random.Generator,
    image: np.ndarray,
    classes: Sequence[int],
    num_classes: int,
    void_radius: int,
) -> np.ndarray:
    """Draw objects of ``classes`` (in order, later on top) into ``image``; return the label map."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    label = np.zeros((height, width), dtype=np.uint8)
    size = min(height, width)
    period = max(4, size // 16)
    for cls in classes:
        ry, rx = rng.uniform(0.13, 0.3, size=2) * size
        cy, cx = rng.uniform(ry * 0.6, height - ry * 0.6), rng.uniform(rx * 0.6, width - rx * 0.6)
        mask = _shape_mask((cls - 1) % len(SHAPES), yy, xx, cy, cx, ry, rx)
        shade = _texture(
            ((cls - 1) // len(SHAPES)) % len(TEXTURES), yy, xx, period, int(rng.integers(0, period))
        )
        colour = _class_colour(cls, num_classes) + rng.uniform(-12, 12, size=3)
        image[mask] = colour * shade[mask][:, None]
        if void_radius > 0:
            label[_dilate(mask, void_radius) & ~mask] = 255
        label[mask] = cls
    return label


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    return np.clip(image + rng.normal(0.0, 5.0, size=image.shape), 0, 255).astype(np.uint8)


def _voc_classes(rng: np.random.Generator, index: int) -> List[int]:
    primary = index % NUM_CLASSES + 1
    if (index // NUM_CLASSES) % 3 == 0:
        return [primary]
    partners = [
        c
        for c in (primary - 10, primary - 5, primary - 1, primary + 1, primary + 5, primary + 10)
        if 1 <= c <= NUM_CLASSES
    ]
    count = int(rng.choice([0, 1, 2], p=[0.3, 0.45, 0.25]))
    companions = list(rng.choice(partners, size=min(count, len(partners)), replace=False))
    return [int(c) for c in companions] + [primary]


def synthetic_voc_item(seed: int, split: int, index: int, width: int, height: int) -> Item:
    """Image ``index`` of split ``split`` (0 train, 1 val) of the synthetic VOC set."""
    rng = np.random.default_rng([seed, split, index])
    image = _background(rng, height, width)
    label = _draw_objects(
        rng, image, _voc_classes(rng, index), NUM_CLASSES, max(1, round(min(height, width) / 80))
    )
    return _finish(rng, image), label


def _write_item(image_path: str, label_path: str, item: Item, palette: Optional[np.ndarray]) -> None:
    image, label = item
    Image.fromarray(image, mode="RGB").save(image_path, quality=90)
    label_image = Image.fromarray(label, mode="L")
    if palette is not None:
        label_image = label_image.convert("P")
        label_image.putpalette(palette.ravel().tolist())
    label_image.save(label_path)


def write_voc_layout(directory: str, train: Sequence[Item], val: Sequence[Item], prefix: str = "syn") -> None:
    """Write (image, label) pairs in the Pascal VOC + SBD layout read by the VOC reader."""
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    palette = color_palette(256)
    for split, items, list_name in (("train", train, "train_aug"), ("val", val, "val")):
        lines = []
        for index, item in enumerate(items):
            name = f"{prefix}_{split}_{index:06d}"
            _write_item(
                os.path.join(directory, "JPEGImages", f"{name}.jpg"),
                os.path.join(directory, "SegmentationClassAug", f"{name}.png"),
                item,
                palette,
            )
            lines.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png\n")
        with open(os.path.join(directory, "splits", f"{list_name}.txt"), "w") as handle:
            handle.writelines(lines)


def write_ade_layout(directory: str, train: Sequence[Item], val: Sequence[Item]) -> None:
    """Write (image, label) pairs in the ADEChallengeData2016 layout (grayscale PNG labels)."""
    for split, items in (("training", train), ("validation", val)):
        image_dir = os.path.join(directory, "images", split)
        label_dir = os.path.join(directory, "annotations", split)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        short = "train" if split == "training" else "val"
        for index, item in enumerate(items):
            name = f"ADE_{short}_{index + 1:08d}"
            _write_item(
                os.path.join(image_dir, f"{name}.jpg"), os.path.join(label_dir, f"{name}.png"), item, None
            )


def generate_synthetic_voc(
    directory: str,
    num_train: int = 600,
    num_val: int = 150,
    width: int = 128,
    height: int = 96,
    seed: int = 0,
) -> str:
    """Write the synthetic VOC set into ``directory`` unless it is already there; return it."""
    if num_train < 1 or num_val < 1 or width < 16 or height < 16:
        raise ValueError("synthetic VOC needs num_train, num_val >= 1 and images of at least 16x16")
    params = {"num_train": num_train, "num_val": num_val, "width": width, "height": height, "seed": seed}
    marker = os.path.join(directory, MARKER)
    if _read_marker(marker) == params:
        return directory
    # Missing, interrupted or made with other parameters: redo from scratch, including cached
    # split files, which would otherwise describe the old images.
    for sub in ("JPEGImages", "SegmentationClassAug", "splits", "incremental-splits"):
        shutil.rmtree(os.path.join(directory, sub), ignore_errors=True)
    if os.path.exists(marker):
        os.remove(marker)
    train = [synthetic_voc_item(seed, 0, i, width, height) for i in range(num_train)]
    val = [synthetic_voc_item(seed, 1, i, width, height) for i in range(num_val)]
    write_voc_layout(directory, train, val)
    _write_marker(marker, params)
    return directory


def ensure_synthetic_voc(root: str) -> str:
    """``<root>/SyntheticVOC``, generated with the default parameters if it is missing or unfinished."""
    directory = os.path.join(root, DIR_NAME)
    if _read_marker(os.path.join(directory, MARKER)) is None:
        generate_synthetic_voc(directory)
    return directory


def generate_synthetic_ade(
    directory: str, num_train: int = 12, num_val: int = 4, width: int = 48, height: int = 32, seed: int = 0
) -> str:
    """Write a tiny ADE20K-layout tree: objects of random classes 1..150 on background 0."""
    items = []
    for split, count in ((0, num_train), (1, num_val)):
        split_items = []
        for index in range(count):
            rng = np.random.default_rng([seed, split, index])
            image = _background(rng, height, width)
            classes = [
                int(c) for c in rng.choice(np.arange(1, 151), size=int(rng.integers(1, 4)), replace=False)
            ]
            label = _draw_objects(rng, image, classes, 150, void_radius=0)
            split_items.append((_finish(rng, image), label))
        items.append(split_items)
    write_ade_layout(directory, items[0], items[1])
    return directory


def item_with_labels(labels: Sequence[int], height: int = 8, width: int = 8, seed: int = 0) -> Item:
    """A random image and a label map made of horizontal bands holding exactly ``labels``.

    For hand-made test trees: the label's set of values is known exactly.
    """
    if not labels or len(labels) > height:
        raise ValueError(f"need 1..{height} labels, got {list(labels)}")
    rng = np.random.default_rng(seed)
    rows = np.arange(height) * len(labels) // height
    label = np.repeat(np.asarray(labels, dtype=np.uint8)[rows][:, None], width, axis=1)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return image, label


def _read_marker(marker: str) -> Optional[dict]:
    try:
        with open(marker) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _write_marker(marker: str, params: dict) -> None:
    atomic_write(marker, lambda handle: json.dump(params, handle), "w")
