"""Synthetic Cityscapes-like domains: a small, deterministic stand-in for ``cityscapes_domain``.

``--dataset synthetic_domain`` reads ``<data_root>/SyntheticCityscapes``, which
:func:`ensure_synthetic_domain` writes on first use, in the Cityscapes layout ``cityscapes.py`` reads::

    SyntheticCityscapes/
        leftImg8bit/<split>/<city>/<city>_000000_<frame>_leftImg8bit.png    RGB images
        gtFine/<split>/<city>/<city>_000000_<frame>_gtFine_labelIds.png     raw Cityscapes label ids
        .generated.json                                                     parameters; written last

for the 21 cities of ``domain_tasks.CITIES``, each in its official split, ``images_per_city`` each.

Scenes. Every image is a street scene holding all 19 classes (at tiny sizes an occluded one can be
missing): sky at the top, a skyline of buildings, vegetation, terrain, a wall and a fence above the
kerb, a sidewalk band, the road, poles carrying a traffic light and a traffic sign, a person on the
sidewalk, a train, a bus and a truck in the far lane, a car, a motorcycle and a bicycle (one of the
two with a rider) in the near lane.
Labels are raw label ids, so the id -> train id mapping is exercised, and include ids that map to
255: the ego vehicle (1) along the bottom, a static object (4) on the sidewalk and unlabeled (0)
specks. Every class keeps its place, shape and texture (window grids on buildings and buses, bars
on fences, tiles on the sidewalk, lane marks on the road, leafy noise on vegetation) in every domain.

Domains. A domain changes how the scene looks, not what it shows:

- colour: every class's hue is rotated by a domain-specific angle, ``8 d / 21`` turns for domain
  ``d`` (so consecutive domains are far apart), and the image gets a colour cast (RGB gains);
- lighting: a domain-specific contrast and brightness;
- texture: a domain-specific pattern over the whole image (grain, horizontal, vertical or diagonal
  stripes, checks, with its own period and strength) and noise level;
- object scale: objects are 0.75x to 1.25x their base size.

Why forgetting is measurable: within a domain, colour identifies a class at once, and a network
fine-tuned on a few domains learns that shortcut; in another domain the same colour belongs to
another class, so a model fine-tuned on the later domains loses accuracy on the first ones. A model
trained on all domains jointly can still label every one of them, from place, shape and texture,
and from the domain's look (e.g. the colour of the sky), which tells it how the colours are rotated.

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
from .cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX, SYNTHETIC_DOMAIN_DIR
from .synthetic import MARKER, Item, _read_marker, _write_item, _write_marker

# Bump when the drawing changes, so that existing folders are regenerated.
GENERATOR_VERSION = 1

# Train ids of the 19 classes (domain_tasks.CITYSCAPES_CLASS_NAMES).
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY,
 PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(NUM_DOMAIN_CLASSES)

# Raw label ids drawn that are not among the 19 classes (all map to 255), with their colours.
UNLABELED, EGO_VEHICLE, STATIC = 0, 1, 4
VOID_COLOURS = {UNLABELED: (20, 20, 20), EGO_VEHICLE: (45, 45, 50), STATIC: (110, 100, 90)}

# A brightness factor at given pixel coordinates (row, column arrays of the same shape).
Texture = Callable[[np.ndarray, np.ndarray], np.ndarray]

DOMAIN_TEXTURES = ("grain", "horizontal stripes", "vertical stripes", "diagonal stripes", "checks")
STYLE_SEED = 2021  # seeds the random part of every domain's look, which does not depend on --seed


@dataclass(frozen=True)
class DomainStyle:
    """How one domain looks."""

    hue_shift: float  # rotation of every class's hue, in turns
    gain: Tuple[float, float, float]  # colour cast: R, G, B multipliers
    contrast: float
    brightness: float  # added after the contrast
    texture: int  # index in DOMAIN_TEXTURES: a pattern laid over the whole image
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
        # 8 and 5 are co-prime with 21: every domain gets its own rotation and scale, and
        # consecutive domains get far-apart ones.
        hue_shift=(8 * domain % NUM_DOMAINS) / NUM_DOMAINS,
        gain=tuple(float(g) for g in rng.uniform(0.75, 1.25, size=3)),
        contrast=float(rng.uniform(0.6, 1.2)),
        brightness=float(rng.uniform(-30.0, 30.0)),
        texture=domain % len(DOMAIN_TEXTURES),
        period=2 + domain // len(DOMAIN_TEXTURES),
        amplitude=float(rng.uniform(10.0, 28.0)),
        noise=float(rng.uniform(2.0, 9.0)),
        scale=0.75 + 0.5 * (5 * domain % NUM_DOMAINS) / (NUM_DOMAINS - 1),
    )


def class_colour(train_id: int, hue_shift: float) -> np.ndarray:
    """RGB (0..255 floats) of class ``train_id`` with its hue rotated by ``hue_shift`` turns."""
    # A hue stride co-prime with 19 gives classes with neighbouring ids far-apart hues.
    hue = (train_id * 7 % NUM_DOMAIN_CLASSES) / NUM_DOMAIN_CLASSES + hue_shift
    saturation = 0.8 if train_id % 2 else 0.55
    value = (0.9, 0.75, 0.6)[train_id % 3]
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255.0


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


def _draw_scene(rng: np.random.Generator, height: int, width: int, scale: float) -> _Scene:
    """One street scene; ``scale`` multiplies the size of the objects."""
    scene = _Scene(height, width)
    kerb = rng.uniform(0.5, 0.58) * height  # top of the sidewalk
    road_top = kerb + rng.uniform(0.07, 0.1) * height
    ego_top = height - max(1.0, rng.uniform(0.04, 0.08) * height)

    scene.paint_class(scene.rect(0, height, 0, width), SKY)
    edges = np.linspace(0, width, int(rng.integers(4, 8)) + 1)
    for left, right in zip(edges[:-1], edges[1:]):
        scene.paint_class(scene.rect(rng.uniform(0.1, 0.35) * height, kerb, left, right), BUILDING,
                          lambda yy, xx: np.where((yy % 4 == 1) & (xx % 4 < 2), 0.6, 1.0))  # windows
    _draw_kerb(scene, rng, kerb, scale)
    for _ in range(int(rng.integers(2, 5))):
        top, left = rng.uniform(0, kerb - 2), rng.uniform(0, width - 2)
        scene.paint(scene.rect(top, top + rng.integers(1, 3), left, left + rng.integers(1, 3)), UNLABELED)
    scene.paint_class(scene.rect(kerb, road_top, 0, width), SIDEWALK,
                      lambda yy, xx: np.where((xx % 5 == 0) | (yy % 4 == 0), 0.8, 1.0))  # tiles
    middle = (road_top + ego_top) / 2
    scene.paint_class(scene.rect(road_top, ego_top, 0, width), ROAD,
                      lambda yy, xx: np.where((np.abs(yy - middle) < 0.6) & (xx % 8 < 4), 1.4, 1.0))  # lane marks
    scene.paint(scene.rect(ego_top, height, 0, width), EGO_VEHICLE)
    _draw_far_lane(scene, rng, road_top + rng.uniform(0.3, 0.4) * (ego_top - road_top), scale)
    left = rng.uniform(0, width * 0.95)
    scene.paint(scene.rect(kerb - 0.05 * height, kerb + 0.03 * height, left, left + 0.04 * width), STATIC)
    _draw_sidewalk_objects(scene, rng, kerb, road_top, scale)
    _draw_near_lane(scene, rng, ego_top - rng.uniform(0.0, 0.03) * height, scale)
    return scene


def _draw_kerb(scene: _Scene, rng: np.random.Generator, kerb: float, scale: float) -> None:
    """Vegetation, terrain, a wall and a fence standing on the kerb, each in its own quarter of the
    width so that none hides another."""
    height, slot = scene.height, scene.width / 4
    for cls, start in zip((VEGETATION, TERRAIN, WALL, FENCE), rng.permutation(4) * slot):
        size = min(1.0, rng.uniform(0.6, 0.9) * scale) * slot
        left = start + rng.uniform(0, slot - size)
        if cls == VEGETATION:
            ry = rng.uniform(0.12, 0.18) * height * scale
            scene.paint_class(scene.ellipse(kerb - ry, left + size / 2, ry, size / 2), VEGETATION,
                              lambda yy, xx: rng.uniform(0.65, 1.1, size=yy.shape))  # leaves
        elif cls == TERRAIN:
            top = kerb - rng.uniform(0.04, 0.07) * height * scale
            scene.paint_class(scene.rect(top, kerb, left, left + size), TERRAIN,
                              lambda yy, xx: rng.uniform(0.85, 1.15, size=yy.shape))  # grass
        elif cls == WALL:
            top = kerb - rng.uniform(0.1, 0.16) * height * scale
            scene.paint_class(scene.rect(top, kerb, left, left + size), WALL,
                              lambda yy, xx: np.where(yy % 3 == 0, 0.75, 1.0))  # courses of bricks
        else:
            top = kerb - rng.uniform(0.08, 0.14) * height * scale
            scene.paint_class(scene.rect(top, kerb, left, left + size), FENCE,
                              lambda yy, xx: np.where(xx % 3 == 0, 0.5, 1.0))  # bars


def _draw_far_lane(scene: _Scene, rng: np.random.Generator, bottom: float, scale: float) -> None:
    """A train, a bus and a truck, each in its own third of the width; low enough to leave the kerb
    objects visible."""
    height, slot = scene.height, scene.width / 3
    for cls, start in zip((TRAIN, BUS, TRUCK), rng.permutation(3) * slot):
        if cls == TRAIN:
            size, tall = rng.uniform(0.85, 1.0) * slot, rng.uniform(0.1, 0.14) * height * scale
            left = start + rng.uniform(0, slot - size)
            scene.paint_class(  # a row of windows
                scene.rect(bottom - tall, bottom, left, left + size), TRAIN,
                lambda yy, xx: np.where((yy > bottom - 0.8 * tall) & (yy < bottom - 0.4 * tall) & (xx % 4 != 0),
                                        0.55, 1.0))
        elif cls == BUS:
            size = min(1.0, rng.uniform(0.6, 0.8) * scale) * slot
            tall = rng.uniform(0.12, 0.15) * height * scale
            left = start + rng.uniform(0, slot - size)
            scene.paint_class(  # windows in the upper part
                scene.rect(bottom - tall, bottom, left, left + size), BUS,
                lambda yy, xx: np.where((yy < bottom - 0.6 * tall) & (xx % 4 < 2), 0.6, 1.0))
        else:
            size = min(0.8, rng.uniform(0.45, 0.6) * scale) * slot  # the box; the cab adds a quarter
            tall = rng.uniform(0.1, 0.13) * height * scale
            left = start + rng.uniform(0, slot - 1.25 * size)
            scene.paint_class(scene.rect(bottom - tall, bottom, left, left + size), TRUCK)
            scene.paint_class(scene.rect(bottom - 0.6 * tall, bottom, left + size, left + 1.25 * size), TRUCK, 0.8)


def _draw_sidewalk_objects(scene: _Scene, rng: np.random.Generator, kerb: float, road_top: float,
                           scale: float) -> None:
    """Two poles, one in each half of the width, carrying a traffic light and a traffic sign; a person."""
    height, width = scene.height, scene.width
    pole_width = max(1.0, 0.012 * width * scale)
    for cls, low in ((TRAFFIC_LIGHT, 0.05), (TRAFFIC_SIGN, 0.55)):
        x = rng.uniform(low, low + 0.4) * width
        top = kerb - rng.uniform(0.3, 0.4) * height * scale
        scene.paint_class(scene.rect(top, road_top, x, x + pole_width), POLE)
        size = max(2.0, 0.08 * height * scale)
        if cls == TRAFFIC_LIGHT:
            scene.paint_class(  # lamps
                scene.rect(top - size, top, x - size / 4, x + pole_width + size / 4), TRAFFIC_LIGHT,
                lambda yy, xx: np.where(yy % 2 == 0, 1.3, 0.5))
        else:
            half, cx = size / 2, x + pole_width / 2
            diamond = np.abs(scene.yy - (top - half)) + np.abs(scene.xx - cx) <= half
            scene.paint_class(diamond, TRAFFIC_SIGN)
    tall = rng.uniform(0.18, 0.24) * height * scale
    scene.paint_class(
        scene.ellipse(road_top - tall / 2, rng.uniform(0.05, 0.95) * width, tall / 2, 0.02 * width * scale), PERSON
    )


def _draw_near_lane(scene: _Scene, rng: np.random.Generator, bottom: float, scale: float) -> None:
    """A car, a motorcycle and a bicycle, each in its own third of the width; one two-wheeler has a rider."""
    height, slot = scene.height, scene.width / 3
    ridden = MOTORCYCLE if rng.random() < 0.5 else BICYCLE
    for cls, start in zip((CAR, MOTORCYCLE, BICYCLE), rng.permutation(3) * slot):
        centre = start + slot / 2 + rng.uniform(-0.15, 0.15) * slot
        if cls == CAR:
            half, tall = min(0.45, rng.uniform(0.28, 0.4) * scale) * slot, 0.1 * height * scale
            scene.paint_class(scene.rect(bottom - tall, bottom, centre - half, centre + half), CAR)
            top = bottom - 1.7 * tall
            cabin = scene.rect(top, bottom - tall, centre - half / 2, centre + half / 2)
            scene.paint_class(cabin, CAR, 0.6)
        elif cls == MOTORCYCLE:
            ry = 0.05 * height * scale
            scene.paint_class(scene.ellipse(bottom - ry, centre, ry, 0.2 * slot * scale), MOTORCYCLE)
            top = bottom - 2 * ry
        else:
            radius = max(1.2, 0.06 * height * scale)
            for cx in (centre - 1.5 * radius, centre + 1.5 * radius):  # wheels: rings
                distance = np.hypot(scene.yy - (bottom - radius), scene.xx - cx)
                scene.paint_class((distance <= radius) & (distance >= 0.45 * radius), BICYCLE)
            frame = scene.rect(bottom - radius, bottom - radius + 1, centre - 1.5 * radius, centre + 1.5 * radius)
            scene.paint_class(frame, BICYCLE)
            top = bottom - 2 * radius
        if cls == ridden:
            tall = rng.uniform(0.12, 0.16) * height * scale
            rider = scene.ellipse(top - tall / 2 + 0.5, centre, tall / 2, 0.02 * scene.width * scale)
            scene.paint_class(rider, RIDER)


def _domain_pattern(style: DomainStyle, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The domain's texture: values in [-1, 1] over the image."""
    name, period = DOMAIN_TEXTURES[style.texture], style.period
    if name == "grain":
        return rng.uniform(-1.0, 1.0, size=yy.shape)
    if name == "horizontal stripes":
        stripes = yy // period
    elif name == "vertical stripes":
        stripes = xx // period
    elif name == "diagonal stripes":
        stripes = (xx + yy) // period
    else:
        stripes = xx // period + yy // period
    return np.where(stripes % 2 == 0, 1.0, -1.0)


def synthetic_domain_item(seed: int, domain: int, index: int, width: int, height: int) -> Item:
    """Image ``index`` of ``domain``: (RGB image (H, W, 3) uint8, raw label ids (H, W) uint8)."""
    style = domain_style(domain)
    rng = np.random.default_rng([seed, domain, index])
    scene = _draw_scene(rng, height, width, style.scale)
    colours = np.zeros((256, 3))
    for train_id, label_id in enumerate(LABEL_ID_OF_TRAIN_ID):
        colours[label_id] = class_colour(train_id, style.hue_shift)
    for label_id, colour in VOID_COLOURS.items():
        colours[label_id] = colour
    image = colours[scene.label] * scene.shade[..., None]
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
    """``<root>/SyntheticCityscapes``, generated with the default parameters if it is missing or unfinished."""
    directory = os.path.join(root, SYNTHETIC_DOMAIN_DIR)
    if _read_marker(os.path.join(directory, MARKER)) is None:
        generate_synthetic_domain(directory)
    return directory
