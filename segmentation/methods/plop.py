"""PLOP (Douillard et al., CVPR 2021): Local POD distillation of the old model's intermediate maps
(``--pod``), entropy-based pseudo-labels of the background (``--pseudo entropy``) and a per-image
weight of the cross-entropy (``--classif_adaptive_factor``). PLOP also keeps MiB's classifier
initialisation (``--init_balanced``, MiB's option) and trains with PLOP's label protocol
(``--label_protocol plop``, an engine option chosen by default with these options).

At step t > 0, with the old model's upsampled logits p_old:

- **Local POD** (``segmentation.pod``): the pre-activation output of the last block of each ResNet
  stage 2-5, the head's output and, with ``--pod_logits``, the stride-16 logits of both models,
  squared, pooled over width and height in 1x1, 2x2 and 4x4 regions; the L2 distance per image,
  weighted per map (``--pod_factor`` for the features, ``--pod_options``' ``after`` factor for
  the last map), times sqrt(C_t / N), averaged over the maps.
- **Pseudo-labels** (``segmentation.pseudo_labels``): before training, one pass of the old model
  over the step's training set (run by the engine: ``Method.data_pass``) counts, per predicted
  class, the background pixels in 100 bins of the normalised entropy; the per-class thresholds
  come from those histograms with the original's arithmetic (``--pseudo_thresholds original``)
  or as a true median (``median``). During training a background pixel whose old-model entropy
  is below its predicted class's threshold gets that class, the others are ignored.
- **Adaptive factor**: each image's cross-entropy times the fraction of its background pixels
  that received a pseudo-label.
"""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Mapping, Optional

from segmentation.config import Config
from segmentation.methods.method import DataPass, Method, Preset, StepOutputs
from segmentation.pod_settings import POD_PREPROCESSING, POD_TYPES, pod_settings
from segmentation.pseudo_modes import PSEUDO_MODES, threshold_probability

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = 255
# The preset's --pod_options: the logits get their own factor and their extra channels summed
# into the background.
PLOP_POD_OPTIONS = json.dumps({"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}})
THRESHOLD_RULES = ("original", "median")
# The maps Local POD distils, in the original's order; the stride-16 logits come last.
STAGE_FEATURES = ("stage2", "stage3", "stage4", "stage5", "pre_logits")
LOGITS_FEATURE = "logits_small"


def _check_pseudo(pseudo: str) -> Optional[str]:
    if pseudo in PSEUDO_MODES:
        return None
    try:
        if threshold_probability(pseudo) is not None:
            return None
    except ValueError:
        return (f"--pseudo {pseudo}: the probability of threshold_<p> must be in (0, 1], e.g. "
                "threshold_0.5 (the original read threshold_5 as p = 5 and ignored every background pixel)")
    if pseudo.startswith(("entropy_", "median_")):
        return (f"--pseudo {pseudo}: the original computed thresholds for this value but then used no "
                "pseudo-labels at all (its training loop compared the exact strings); pass --pseudo "
                f"{pseudo.split('_')[0]} or leave --pseudo out")
    return f"--pseudo {pseudo}: unknown; valid: {', '.join(PSEUDO_MODES)} or threshold_<p>"


class PLOP(Method):
    name = "PLOP"
    paper_row = "PLOP"
    summary = "CE on entropy pseudo-labels x adaptive factor + Local POD + classifier init from background"
    preset = {
        "pod": "local",
        "pod_factor": 0.01,
        "pod_logits": True,
        "pod_options": PLOP_POD_OPTIONS,
        "pseudo": "entropy",
        "threshold": 0.001,
        "classif_adaptive_factor": True,
        "init_balanced": True,
    }
    incremental_options = frozenset({
        "pod", "pod_factor", "pod_options", "pod_logits", "pod_prepro", "spp_scales", "no_pod_schedule",
        "pseudo", "threshold", "pseudo_nb_bins", "pseudo_thresholds", "classif_adaptive_factor",
        "classif_adaptive_min_factor",
    })
    non_negative_options = frozenset({"pod_factor", "threshold", "classif_adaptive_min_factor"})
    label_protocol = "plop"

    # ------------------------------------------------------------ command line (no torch)
    @classmethod
    def domain_preset(cls, task: str) -> Preset:
        # PLOP's Cityscapes-domain scripts: Local POD only (no pseudo-labels, no init: there is no
        # background), 1e-4 on the features, on the logits 1e-3 for 1-1 and 1e-4 otherwise.
        logits_factor = 0.001 if task == "1-1" else 0.0001
        return {"pod": "local", "pod_factor": 0.0001, "pod_logits": True,
                "pod_options": json.dumps({"switch": {"after": {"extra_channels": "sum", "factor": logits_factor,
                                                                "type": "local"}}})}

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--pod", choices=POD_TYPES, default=None,
                           help="POD distillation of the intermediate maps (PLOP: local)")
        group.add_argument("--pod_factor", type=float, default=5.0,
                           help="weight of each distilled map (PLOP preset: 0.01; PLOP's ADE scripts: 0.001)")
        group.add_argument("--pod_options", default=None, metavar="JSON",
                           help='per-map overrides, e.g. \'{"switch": {"after": {"extra_channels": "sum", '
                                '"factor": 0.0005, "type": "local"}}}\' (the last map: "after")')
        group.add_argument("--pod_logits", action="store_true",
                           help="also distil the stride-16 logits (the last map)")
        group.add_argument("--pod_prepro", choices=POD_PREPROCESSING, default="pow",
                           help="element-wise preprocessing of the maps before pooling")
        group.add_argument("--spp_scales", type=int, nargs="+", default=[1, 2, 4],
                           help="grid sizes of Local POD's regions")
        group.add_argument("--no_pod_schedule", action="store_true",
                           help="do not multiply POD by sqrt(channels / new channels)")
        group.add_argument("--pseudo", default=None,
                           help="pseudo-labels of background pixels from the old model: entropy (PLOP), "
                                "median, naive, confidence or threshold_<p>")
        group.add_argument("--threshold", type=float, default=0.9,
                           help="floor of the entropy thresholds (PLOP: 0.001); cap of the median mode's")
        group.add_argument("--pseudo_nb_bins", type=int, default=None,
                           help="histogram bins of the threshold pass (default: 100 entropy, 20 median)")
        group.add_argument("--pseudo_thresholds", choices=THRESHOLD_RULES, default="original",
                           help="per-class thresholds from the histograms with the original's arithmetic "
                                "(PLOP's numbers) or as the true median")
        group.add_argument("--classif_adaptive_factor", action="store_true",
                           help="weight each image's cross-entropy by its share of pseudo-labelled background")
        group.add_argument("--classif_adaptive_min_factor", type=float, default=0.0,
                           help="lower bound of that weight (0: none)")

    @classmethod
    def check_options(cls, config: Config) -> Optional[str]:
        options = config.methods
        if options.pseudo is not None:
            problem = _check_pseudo(options.pseudo)
            if problem:
                return problem
            if options.unce:
                return (f"--pseudo {options.pseudo} and --unce both replace the cross-entropy; give one "
                        "(PLOP trains plain cross-entropy on its pseudo-labels)")
        if options.pseudo_nb_bins is not None and options.pseudo_nb_bins < 1:
            return f"--pseudo_nb_bins {options.pseudo_nb_bins}: needs at least 1 bin"
        if any(scale < 1 for scale in options.spp_scales):
            return f"--spp_scales {' '.join(map(str, options.spp_scales))}: grid sizes must be >= 1"
        if options.pod is not None:
            try:
                settings = pod_settings(options.pod, options.pod_factor, options.pod_options, options.pod_prepro,
                                        options.spp_scales, options.no_pod_schedule)
            except ValueError as error:
                return str(error)
            grid = max((max(layer.spp_scales) for layer in (settings.features, settings.last)
                        if layer.type != "spatial"), default=1)
            smallest = config.crop_size // config.output_stride
            if smallest < grid:
                return (f"--crop_size {config.crop_size}: POD's {grid}x{grid} grid needs maps of at least {grid} "
                        f"pixels, and the smallest here is {smallest} (stride {config.output_stride}); use crops "
                        f"of at least {grid * config.output_stride} px or smaller --spp_scales")
        elif options.pod_options is not None or options.pod_logits:
            return "--pod_options and --pod_logits configure POD: add --pod local (PLOP) or leave them out"
        return None

    @classmethod
    def active(cls, config: Config) -> bool:
        return config.methods.pod is not None or config.methods.pseudo is not None

    @classmethod
    def launch_warnings(cls, config: Config) -> List[str]:
        if config.methods.classif_adaptive_factor and config.methods.pseudo != "entropy":
            return ["--classif_adaptive_factor acts only with --pseudo entropy (as in the original): ignored"]
        return []

    # ------------------------------------------------------------ one step
    def __init__(self, config: Config, step) -> None:
        super().__init__(config, step)
        options = config.methods
        incremental = step.num_old_channels > 0
        self.use_pod = options.pod is not None and incremental
        self.pseudo = options.pseudo if incremental else None
        self.thresholds: Optional["torch.Tensor"] = None
        # The distilled maps, in the original's order (the last one gets --pod_options' "after").
        self.pod_maps = (STAGE_FEATURES + ((LOGITS_FEATURE,) if options.pod_logits else ())) if self.use_pod else ()
        if self.use_pod:
            self.pod_settings = pod_settings(options.pod, options.pod_factor, options.pod_options,
                                             options.pod_prepro, options.spp_scales, options.no_pod_schedule)

    @property
    def _needs_thresholds(self) -> bool:
        return self.pseudo in ("entropy", "median")

    @property
    def needs_old_model(self) -> bool:
        return self.use_pod or self.pseudo is not None

    @property
    def feature_names(self) -> FrozenSet[str]:
        return frozenset(self.pod_maps)

    def data_pass(self) -> Optional[DataPass]:
        if not self._needs_thresholds:
            return None
        return ThresholdPass(self)

    def set_thresholds(self, thresholds: "torch.Tensor") -> None:
        self.thresholds = thresholds

    def classification(self) -> Optional[Callable[[StepOutputs], Any]]:
        if self.pseudo is None:
            return None
        import torch.nn.functional as F

        from segmentation.pseudo_labels import pseudo_label

        options = self.config.methods

        def cross_entropy_on_pseudo_labels(outputs: StepOutputs):
            if self._needs_thresholds and self.thresholds is None:
                raise RuntimeError("PLOP's thresholds were not computed before training (no pass over the data)")
            relabelled = pseudo_label(
                outputs.labels, outputs.old_logits, self.pseudo, self.step.num_old_channels,
                self.step.num_channels, thresholds=self.thresholds,
                adaptive_factor=options.classif_adaptive_factor and self.pseudo == "entropy",
                min_factor=options.classif_adaptive_min_factor,
            )
            loss = F.cross_entropy(outputs.logits, relabelled.labels, ignore_index=IGNORE_INDEX, reduction="none")
            if relabelled.pixel_weights is not None:
                loss = loss * relabelled.pixel_weights.to(loss.dtype)
            if relabelled.image_weights is not None:
                loss = loss * relabelled.image_weights.to(loss.dtype).view(-1, 1, 1)
            return loss

        return cross_entropy_on_pseudo_labels

    def loss_terms(self, outputs: StepOutputs) -> Dict[str, Any]:
        if not self.use_pod:
            return {}
        from segmentation.pod import pod_loss

        return {"loss_pod": pod_loss(
            [outputs.old_features[name] for name in self.pod_maps], [outputs.features[name] for name in self.pod_maps],
            self.pod_settings, num_channels=self.step.num_channels,
            num_new_channels=self.step.num_new_channels, labels=outputs.labels,
        )}

    def state_dict(self) -> Optional[Dict[str, Any]]:
        if not self._needs_thresholds:
            return None
        return {"thresholds": self.thresholds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._needs_thresholds:
            self.thresholds = state["thresholds"]


class ThresholdPass(DataPass):
    """Histograms of the old model's uncertainty over the background pixels (label 0) of the
    step's training set, per predicted class; their per-class thresholds go to the method."""

    def __init__(self, method: PLOP) -> None:
        from segmentation import pseudo_labels

        options = method.config.methods
        self.method = method
        self.mode = "entropy" if method.pseudo == "entropy" else "probability"
        num_old, num_channels = method.step.num_old_channels, method.step.num_channels
        if options.pseudo_thresholds == "original":
            self.bins = options.pseudo_nb_bins or pseudo_labels.ORIGINAL_BINS[self.mode]
            self.value_range = 1.0
        else:
            self.bins = options.pseudo_nb_bins or pseudo_labels.MEDIAN_BINS
            self.value_range = (pseudo_labels.max_uncertainty(num_old, num_channels)
                                if self.mode == "entropy" else 1.0)
        self.name = f"PLOP's {self.mode} thresholds ({self.bins} bins)"
        self.num_channels = num_channels

    def new_counts(self, device: "torch.device") -> "torch.Tensor":
        import torch

        return torch.zeros(self.num_channels, self.bins, dtype=torch.int64, device=device)

    def add_batch(self, counts: "torch.Tensor", labels: "torch.Tensor", old_logits: "torch.Tensor") -> None:
        from segmentation import pseudo_labels

        if self.mode == "entropy":
            values = pseudo_labels.entropy_uncertainty(old_logits, self.num_channels)
            predicted = old_logits.argmax(dim=1)
        else:
            values, predicted = pseudo_labels.max_probability(old_logits)
        pseudo_labels.add_to_histograms(counts, values, predicted, labels == 0, self.value_range)

    def finish(self, counts: "torch.Tensor") -> None:
        from segmentation import pseudo_labels

        floor = self.method.config.methods.threshold
        if self.method.config.methods.pseudo_thresholds == "original":
            thresholds = pseudo_labels.original_thresholds(counts, floor, self.mode)
        else:
            thresholds = pseudo_labels.median_thresholds(counts, self.value_range, floor, self.mode)
        self.method.set_thresholds(thresholds.to(counts.device))
