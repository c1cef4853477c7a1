"""Synthetic Cityscapes-like domains: a small, deterministic stand-in for ``cityscapes_domain``.

``--dataset synthetic_domain`` reads ``<data_root>/SyntheticCityscapes``, which
:func:`ensure_synthetic_domain` writes on first use, in the Cityscapes layout ``cityscapes.py`` reads::

    SyntheticCityscapes/
        leftImg8bit/<split>/<city>/<city>_000000_<frame>_leftImg8bit.png    RGB images
        gtFine/<split>/<city>/<city>_000000_<frame>_gtFine_labelIds.png     raw Cityscapes label ids
        .generated.json                                                     parameters; written last

for the 21 cities of ``domain_tasks.CITIES``, each in its official split, ``images_per_city`` each.

Scenes. Every image holds all 19 classes (at tiny sizes an occluded one can be missing). The six
"stuff" classes (sky, building, vegetation, terrain, sidewalk, road) are full-width horizontal
bands with ragged edges, in a domain-specific top-to-bottom order and random heights. The
"things" are drawn in a jittered 4 x 3 grid of cells, one per cell, in random cells: a wall, a
fence (posts and rails), two poles carrying a traffic light and a traffic sign, a person, a car, a
truck (box and cab), a bus, a train, a motorcycle and a bicycle (wheels and frame; one of the two
with a rider on it), and a static object. Labels are raw label ids, so the id -> train id mapping is
exercised, and include ids that map to 255: the ego vehicle (1) along the bottom, the static
object (4) and unlabeled (0) specks.

Appearances. There is one shared palette of 19 appearances, each a colour and a texture (flat,
windows, bricks, bars, leaves, tiles, dots). In domain ``d`` class ``c`` wears appearance
``domain_style(d).appearance[c]``: a domain-specific permutation of the palette, so within a
domain appearance identifies the class, but the same colour and texture is a road in one city and a
bus or the sky in another, and a class's appearance changes from city to city.

Domains. Besides the permutation of appearances and the order of the bands, a domain has a look
of its own, which tells the domains apart:

- a pattern over the whole image: one of 7 kinds (horizontal, vertical, diagonal or anti-diagonal
  stripes, checks, a grid, blocky grain) with one of 3 periods, a different pair for every domain;
- a colour cast (RGB gains), a contrast and a brightness (lighting), and a noise level;
- an object scale: objects are 0.75x to 1.25x their base size.

Why forgetting is measurable: neither place nor appearance identifies a class across domains.
Things sit anywhere, the bands change order, and colour and texture are re-assigned to other
classes; only shapes (thin poles, wheels, a rider on a two-wheeler) are shared. A network trained
on some domains learns their appearance -> class and band-order mappings; fine-tuned on later
domains, whose mappings conflict, it relabels the first domains' pixels and loses accuracy on them,
while a method that keeps the old model's outputs (distillation) keeps more. A model trained on all
domains jointly can still label every one: the domain's pattern and cast, visible everywhere in the
image, tell it which mapping applies.

Determinism. A domain's look depends only on its id; image ``i`` of domain ``d`` is drawn from
``numpy.random.default_rng([seed, d, i])``. A finished folder (marker with the same parameters) is
left alone; an interrupted one or one made with other parameters is wiped and redone. The defaults
(21 cities x 12 images of 96x48) take about a second to write.
"""

from __future__ import annotations

import colorsys
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Tuple, Union

import numpy as np

from ..domain_tasks import CITIES, LABEL_ID_OF_TRAIN_ID, NUM_DOMAIN_CLASSES, NUM_DOMAINS
from ..domain_tasks import SYNTHETIC_DOMAIN_DIR
from .cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX
from .synthetic import MARKER, Item, _read_marker, _write_item, _write_marker

# Bump when the drawing changes, so that existing folders are regenerated.
GENERATOR_VERSION = 2

# Train ids of the 19 classes (domain_tasks.CITYSCAPES_CLASS_NAMES).
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY,
 PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(NUM_DOMAIN_CLASSES)
STUFF = (SKY, BUILDING, VEGETATION, TERRAIN, SIDEWALK, ROAD)  # the horizontal bands

# Raw label ids drawn that are not among the 19 classes (all map to 255), with their colours.
UNLABELED, EGO_VEHICLE, STATIC = 0, 1, 4
VOID_COLOURS = {UNLABELED: (20, 20, 20), EGO_VEHICLE: (45, 45, 50), STATIC: (110, 100, 90)}

# A brightness factor at given pixel coordinates (row, column arrays of the same shape).
Texture = Callable[[np.ndarray, np.ndarray], np.ndarray]

APPEARANCE_TEXTURES = ("flat", "windows", "bricks", "bars", "leaves", "tiles", "dots")
DOMAIN_PATTERNS = ("horizontal stripes", "vertical stripes", "diagonal stripes", "anti-diagonal stripes",
                   "checks", "grid", "grain")
STYLE_SEED = 2021  # seeds the random part of every domain's look, which does not depend on --seed

# The things, one per grid cell ("light" and "sign" are poles carrying them).
THINGS = ("wall", "fence", "light", "sign", "person", "car", "truck", "bus", "train", "motorcycle", "bicycle",
          "static")
GRID_ROWS, GRID_COLUMNS = 3, 4


@dataclass(frozen=True)
class DomainStyle:
    """How one domain looks."""

    appearance: Tuple[int, ...]  # appearance (palette index) of each train id: a permutation of 0..18
    band_order: Tuple[int, ...]  # train ids of the stuff bands, top to bottom
    gain: Tuple[float, float, float]  # colour cast: R, G, B multipliers
    contrast: float
    brightness: float  # added after the contrast
    pattern: int  # index in DOMAIN_PATTERNS: laid over the whole image
    period: int  # of the pattern, in pixels
    amplitude: float  # of the pattern, in grey levels
    noise: float  # standard deviation of the per-pixel noise
    scale: float  # object size factor


def domain_style(domain: int) -> DomainStyle:
    """The look of ``domain`` (0..20)."""
    if not 0 <= domain < NUM_DOMAINS:
        raise ValueError(f"unknown domain id {domain}; valid domain ids: 0..{NUM_DOMAINS - 1}")
    rng = np.random.default_rng([STYLE_SEED, domain])
    return DomainStyle(
        appearance=tuple(int(a) for a in rng.permutation(NUM_DOMAIN_CLASSES)),
        band_order=tuple(int(STUFF[i]) for i in rng.permutation(len(STUFF))),
        gain=tuple(float(g) for g in rng.uniform(0.85, 1.15, size=3)),
        contrast=float(rng.uniform(0.75, 1.1)),
        brightness=float(rng.uniform(-20.0, 20.0)),
        # 7 kinds x 3 periods: a different pattern for each of the 21 domains.
        pattern=domain % len(DOMAIN_PATTERNS),
        period=2 + domain // len(DOMAIN_PATTERNS),
        amplitude=float(rng.uniform(12.0, 24.0)),
        noise=float(rng.uniform(2.0, 7.0)),
        # 5 is co-prime with 21: every domain gets its own scale, consecutive ones far-apart scales.
        scale=0.75 + 0.5 * (5 * domain % NUM_DOMAINS) / (NUM_DOMAINS - 1),
    )


def appearance_colour(appearance: int) -> np.ndarray:
    """RGB (0..255 floats) of palette entry ``appearance`` (0..18)."""
    # A hue stride co-prime with 19 gives neighbouring entries far-apart hues.
    hue = (appearance * 7 % NUM_DOMAIN_CLASSES) / NUM_DOMAIN_CLASSES
    saturation = 0.85 if appearance % 2 else 0.5
    value = (0.95, 0.75, 0.55)[appearance % 3]
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255.0


def class_colour(train_id: int, domain: int) -> np.ndarray:
    """RGB (0..255 floats) of class ``train_id`` in ``domain``, before the domain's cast and lighting."""
    return appearance_colour(domain_style(domain).appearance[train_id])


def _appearance_texture(appearance: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Brightness factor of palette entry ``appearance`` at the given pixels."""
    name = APPEARANCE_TEXTURES[appearance % len(APPEARANCE_TEXTURES)]
    if name == "windows":
        return np.where((yy % 4 == 1) & (xx % 4 < 2), 0.6, 1.0)
    if name == "bricks":
        return np.where(yy % 3 == 0, 0.72, 1.0)
    if name == "bars":
        return np.where(xx % 3 == 0, 0.55, 1.0)
    if name == "leaves":
        return rng.uniform(0.65, 1.1, size=yy.shape)
    if name == "tiles":
        return np.where((xx % 5 == 0) | (yy % 4 == 0), 0.78, 1.0)
    if name == "dots":
        return np.where((yy % 3 == 1) & (xx % 3 == 1), 1.35, 1.0)
    return np.ones(yy.shape)


class _Scene:
    """A label-id map and a per-pixel brightness factor, painted shape by shape (later on top)."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float64)
        self.label = np.full((height, width), UNLABELED, dtype=np.uint8)
        self.shade = np.ones((height, width))

    def paint(self, region, label_id: int, shade: Union[float, Texture] = 1.0) -> None:
        """Paint ``region`` (a boolean mask or a ``rect``) with a brightness factor, a number or a
        texture evaluated at the region's pixel coordinates."""
        self.label[region] = label_id
        self.shade[region] = shade(self.yy[region], self.xx[region]) if callable(shade) else shade

    def paint_class(self, region, train_id: int, shade: Union[float, Texture] = 1.0) -> None:
        self.paint(region, LABEL_ID_OF_TRAIN_ID[train_id], shade)

    def rect(self, top: float, bottom: float, left: float, right: float) -> Tuple[slice, slice]:
        """The pixels of a box (an index into the maps), at least one pixel in each direction."""
        top, left = min(max(int(top), 0), self.height - 1), min(max(int(left), 0), self.width - 1)
        bottom, right = max(top + 1, int(round(bottom))), max(left + 1, int(round(right)))
        return slice(top, bottom), slice(left, right)

    def ellipse(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        # Radii of at least 0.75 px always cover the pixel nearest to the centre.
        ry, rx = max(ry, 0.75), max(rx, 0.75)
        return ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0


def _draw_scene(rng: np.random.Generator, height: int, width: int, style: DomainStyle) -> _Scene:
    """One scene: the stuff bands in the domain's order, then one thing in each grid cell."""
    scene = _Scene(height, width)
    ego_top = height - max(1.0, rng.uniform(0.04, 0.08) * height)
    weights = rng.uniform(0.7, 1.3, size=len(STUFF))
    edges = ego_top * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    scene.paint_class(scene.rect(0, ego_top, 0, width), style.band_order[0])
    for position in range(1, len(STUFF)):
        # A ragged upper edge, within 0.3 of the thinner neighbouring band of its mean height.
        thinner = min(edges[position] - edges[position - 1], edges[position + 1] - edges[position])
        columns = np.linspace(0, width, int(rng.integers(3, 7)) + 1)
        offsets = rng.uniform(-0.3, 0.3, size=len(columns) - 1) * thinner
        edge = edges[position] + offsets[np.searchsorted(columns[1:-1], scene.xx, side="right")]
        scene.paint_class((scene.yy >= np.round(edge)) & (scene.yy < ego_top), style.band_order[position])
    scene.paint(scene.rect(ego_top, height, 0, width), EGO_VEHICLE)
    for _ in range(int(rng.integers(2, 5))):
        top, left = rng.uniform(0, ego_top - 2), rng.uniform(0, width - 2)
        scene.paint(scene.rect(top, top + rng.integers(1, 3), left, left + rng.integers(1, 3)), UNLABELED)
    rows, columns = np.linspace(0, ego_top, GRID_ROWS + 1), np.linspace(0, width, GRID_COLUMNS + 1)
    ridden = "motorcycle" if rng.random() < 0.5 else "bicycle"
    for thing, cell in zip(THINGS, rng.permutation(GRID_ROWS * GRID_COLUMNS)):
        row, column = divmod(int(cell), GRID_COLUMNS)
        _draw_thing(scene, rng, thing, (rows[row], rows[row + 1], columns[column], columns[column + 1]),
                    style.scale, thing == ridden)
    return scene


def _draw_thing(scene: _Scene, rng: np.random.Generator, thing: str, cell: Tuple[float, float, float, float],
                scale: float, ridden: bool) -> None:
    """``thing`` inside ``cell`` (top, bottom, left, right), at a random place in it."""
    top, bottom, left, right = cell
    cell_height, cell_width = bottom - top, right - left

    def place(tall: float, wide: float) -> Tuple[float, float, float, float]:
        """A box of ``tall`` x ``wide`` (fractions of the cell, times the scale) somewhere in the cell."""
        tall, wide = min(cell_height, tall * scale * cell_height), min(cell_width, wide * scale * cell_width)
        y, x = rng.uniform(top, bottom - tall), rng.uniform(left, right - wide)
        return y, y + tall, x, x + wide

    if thing == "wall":
        scene.paint_class(scene.rect(*place(rng.uniform(0.4, 0.7), rng.uniform(0.55, 0.8))), WALL)
    elif thing == "fence":  # posts and two rails
        y0, y1, x0, x1 = place(rng.uniform(0.4, 0.65), rng.uniform(0.55, 0.8))
        region = scene.rect(y0, y1, x0, x1)
        yy, xx = scene.yy[region], scene.xx[region]
        rails = (np.abs(yy - (y0 + 0.25 * (y1 - y0))) < 0.6) | (np.abs(yy - (y0 + 0.7 * (y1 - y0))) < 0.6)
        mask = np.zeros(scene.label.shape, dtype=bool)
        mask[region] = rails | (xx % 3 == 0)
        scene.paint_class(mask, FENCE)
    elif thing in ("light", "sign"):  # a pole carrying it
        y0, y1, x0, _ = place(rng.uniform(0.75, 0.95), 0.0)
        x0 = min(x0 + 0.3 * cell_width, right - 2.0)
        pole_width = max(1.0, 0.05 * cell_width * scale)
        size = max(2.0, 0.25 * cell_height * scale)
        scene.paint_class(scene.rect(y0 + size, y1, x0, x0 + pole_width), POLE)
        if thing == "light":
            scene.paint_class(scene.rect(y0, y0 + size, x0 - size / 4, x0 + pole_width + size / 4), TRAFFIC_LIGHT)
        else:
            half, cx = size / 2, x0 + pole_width / 2
            diamond = np.abs(scene.yy - (y0 + half)) + np.abs(scene.xx - cx) <= half
            scene.paint_class(diamond, TRAFFIC_SIGN)
    elif thing == "person":
        y0, y1, x0, x1 = place(rng.uniform(0.6, 0.85), 0.15)
        scene.paint_class(scene.ellipse((y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2), PERSON)
    elif thing == "car":  # a body and a darker cabin
        y0, y1, x0, x1 = place(rng.uniform(0.5, 0.7), rng.uniform(0.6, 0.85))
        split, quarter = y0 + 0.45 * (y1 - y0), (x1 - x0) / 4
        scene.paint_class(scene.rect(split, y1, x0, x1), CAR)
        scene.paint_class(scene.rect(y0, split, x0 + quarter, x1 - quarter), CAR, 0.6)
    elif thing == "truck":  # a box and a lower cab
        y0, y1, x0, x1 = place(rng.uniform(0.5, 0.75), rng.uniform(0.7, 0.9))
        box = x0 + 0.75 * (x1 - x0)
        scene.paint_class(scene.rect(y0, y1, x0, box), TRUCK)
        scene.paint_class(scene.rect(y0 + 0.4 * (y1 - y0), y1, box, x1), TRUCK, 0.8)
    elif thing == "bus":
        scene.paint_class(scene.rect(*place(rng.uniform(0.55, 0.75), rng.uniform(0.7, 0.9))), BUS)
    elif thing == "train":
        scene.paint_class(scene.rect(*place(rng.uniform(0.4, 0.55), rng.uniform(0.9, 1.0) / scale)), TRAIN)
    elif thing == "static":
        scene.paint(scene.rect(*place(rng.uniform(0.3, 0.5), rng.uniform(0.15, 0.25))), STATIC)
    else:  # a two-wheeler in the lower part of the cell, maybe with a rider above it
        y0, y1, x0, x1 = place(rng.uniform(0.3, 0.4), rng.uniform(0.45, 0.6))
        y0, y1 = bottom - (y1 - y0), bottom
        cx = (x0 + x1) / 2
        if thing == "motorcycle":
            scene.paint_class(scene.ellipse((y0 + y1) / 2, cx, (y1 - y0) / 2, (x1 - x0) / 2), MOTORCYCLE)
        else:  # two rings and a frame
            radius = max(1.2, min((y1 - y0) / 2, (x1 - x0) / 4))
            for wheel in (cx - 1.5 * radius, cx + 1.5 * radius):
                distance = np.hypot(scene.yy - (y1 - radius), scene.xx - wheel)
                scene.paint_class((distance <= radius) & (distance >= 0.45 * radius), BICYCLE)
            scene.paint_class(scene.rect(y1 - radius, y1 - radius + 1, cx - 1.5 * radius, cx + 1.5 * radius),
                              BICYCLE)
        if ridden:
            tall = max(1.5, (y0 - top) * rng.uniform(0.7, 0.95))
            scene.paint_class(scene.ellipse(y0 - tall / 2 + 0.5, cx, tall / 2, 0.08 * cell_width * scale), RIDER)


def _domain_pattern(style: DomainStyle, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The domain's pattern: values in [-1, 1] over the image."""
    name, period = DOMAIN_PATTERNS[style.pattern], style.period
    iy, ix = (yy // period).astype(np.int64), (xx // period).astype(np.int64)
    if name == "grain":  # blocks of period x period pixels
        return rng.uniform(-1.0, 1.0, size=(iy.max() + 1, ix.max() + 1))[iy, ix]
    if name == "grid":
        return np.where((yy % (period + 1) == 0) | (xx % (period + 1) == 0), 1.0, -0.3)
    stripes = {"horizontal stripes": iy, "vertical stripes": ix, "diagonal stripes": (xx + yy) // period,
               "anti-diagonal stripes": (xx - yy) // period, "checks": ix + iy}[name]
    return np.where(stripes % 2 == 0, 1.0, -1.0)


def synthetic_domain_item(seed: int, domain: int, index: int, width: int, height: int) -> Item:
    """Image ``index`` of ``domain``: (RGB image (H, W, 3) uint8, raw label ids (H, W) uint8)."""
    style = domain_style(domain)
    rng = np.random.default_rng([seed, domain, index])
    scene = _draw_scene(rng, height, width, style)
    colours = np.zeros((256, 3))
    appearance = np.full(256, -1)
    for train_id, label_id in enumerate(LABEL_ID_OF_TRAIN_ID):
        appearance[label_id] = style.appearance[train_id]
        colours[label_id] = appearance_colour(style.appearance[train_id])
    for label_id, colour in VOID_COLOURS.items():
        colours[label_id] = colour
    shade = scene.shade
    appearances = appearance[scene.label]
    for entry in range(NUM_DOMAIN_CLASSES):
        region = appearances == entry
        if region.any():
            shade[region] *= _appearance_texture(entry, rng, scene.yy[region], scene.xx[region])
    image = colours[scene.label] * shade[..., None]
    image += style.amplitude * _domain_pattern(style, rng, scene.yy, scene.xx)[..., None]
    image *= np.asarray(style.gain)
    image = (image - 128.0) * style.contrast + 128.0 + style.brightness
    image += rng.normal(0.0, style.noise, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), scene.label


def generate_synthetic_domain(
    directory: str, images_per_city: int = 12, width: int = 96, height: int = 48, seed: int = 0
) -> str:
    """Write the synthetic Cityscapes tree into ``directory`` unless it is already there; return it."""
    if images_per_city < 1 or width < 16 or height < 16:
        raise ValueError("synthetic Cityscapes needs images_per_city >= 1 and images of at least 16x16")
    params = {"images_per_city": images_per_city, "width": width, "height": height, "seed": seed,
              "version": GENERATOR_VERSION}
    marker = os.path.join(directory, MARKER)
    if _read_marker(marker) == params:
        return directory
    # Missing, interrupted or made with other parameters: redo from scratch.
    for sub in ("leftImg8bit", "gtFine"):
        shutil.rmtree(os.path.join(directory, sub), ignore_errors=True)
    if os.path.exists(marker):
        os.remove(marker)
    for domain, (city, split) in enumerate(CITIES):
        image_dir = os.path.join(directory, "leftImg8bit", split, city)
        label_dir = os.path.join(directory, "gtFine", split, city)
        os.makedirs(image_dir)
        os.makedirs(label_dir)
        for index in range(images_per_city):
            stem = f"{city}_000000_{index:06d}"
            _write_item(
                os.path.join(image_dir, stem + IMAGE_SUFFIX),
                os.path.join(label_dir, stem + LABEL_SUFFIX),
                synthetic_domain_item(seed, domain, index, width, height),
                None,
            )
    _write_marker(marker, params)
    return directory


def ensure_synthetic_domain(root: str) -> str:
    """``<root>/SyntheticCityscapes``, generated with the default parameters if it is missing, unfinished or
    written by another version of the generator (a tree of other parameters is kept)."""
    directory = os.path.join(root, SYNTHETIC_DOMAIN_DIR)
    marker = _read_marker(os.path.join(directory, MARKER))
    if marker is None or marker.get("version") != GENERATOR_VERSION:
        generate_synthetic_domain(directory)
    return directory
