"""Class names of each dataset, indexed by original label."""
from __future__ import annotations

from typing import Dict, List

from ..domain_tasks import CITYSCAPES_CLASS_NAMES
from .synthetic import class_descriptions

VOC_CLASS_NAMES: List[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]

# ADE20K SceneParsing (150 classes); label 0 is "other" (void in the benchmark's own tools).
ADE_CLASS_NAMES: List[str] = [
    "other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
]


# Synthetic classes are named after their look (see synthetic.py).
SYNTHETIC_CLASS_NAMES: List[str] = ["background"] + class_descriptions()

CLASS_NAMES: Dict[str, List[str]] = {
    "voc": VOC_CLASS_NAMES,
    "ade": ADE_CLASS_NAMES,
    "synthetic": SYNTHETIC_CLASS_NAMES,
    # Indexed by train id: the synthetic domain set draws the same 19 classes.
    "cityscapes_domain": CITYSCAPES_CLASS_NAMES,
    "synthetic_domain": CITYSCAPES_CLASS_NAMES,
}
