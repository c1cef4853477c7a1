"""PLOP as a method: its preset and option checks, and one step's loss against the spec's formulas
(cross-entropy on the pseudo-labels times the adaptive factor, averaged over every pixel, plus
Local POD on the six maps in the original's order), the thresholds' pass and their state."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from option_helpers import option_workdir, synthetic_config, usage_error  # noqa: F401 (a fixture)
from segmentation.methods import active_methods
from segmentation.methods.plop import PLOP, PLOP_POD_OPTIONS
from segmentation.methods.step_methods import StepOutputs, step_methods
from segmentation.pod import pod_loss
from segmentation.pod_settings import pod_settings

OLD, NEW = 16, 5  # synthetic 15-5: channels of step 0 (background included) and of step 1
B, H, W = 2, 16, 16
MAPS = {"stage2": 6, "stage3": 7, "stage4": 8, "stage5": 9, "pre_logits": 5}


def test_method_plop_fills_in_plops_preset():
    config = synthetic_config("--method", "PLOP")
    options = config.methods
    assert (options.pod, options.pod_factor, options.pod_logits, options.pseudo, options.threshold) == (
        "local", 0.01, True, "entropy", 0.001)
    assert json.loads(options.pod_options) == {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005,
                                                                    "type": "local"}}}
    assert options.classif_adaptive_factor and options.init_balanced and not options.unce and not options.unkd
    assert [method.name for method in active_methods(config)] == ["MiB", "PLOP"]  # MiB: the classifier init only
    assert config.label_protocol == "plop"


def test_explicit_options_win_over_the_preset():
    # The original's presets overwrote the command line (PLOP + --pod_options was ignored); here the
    # explicit value wins, as for every other method.
    after = '{"switch": {"after": {"extra_channels": "sum", "factor": 0.00001, "type": "local"}}}'
    options = synthetic_config("--method", "PLOP", "--pod_factor", "0.001", "--pod_options", after).methods
    assert (options.pod_factor, options.pod_options) == (0.001, after)


def test_plops_readme_line_with_ft_and_flags_equals_method_plop():
    flags = ["--method", "FT", "--pod", "local", "--pod_factor", "0.01", "--pod_logits", "--pseudo", "entropy",
             "--threshold", "0.001", "--classif_adaptive_factor", "--init_balanced", "--pod_options",
             PLOP_POD_OPTIONS]
    by_flags, by_method = synthetic_config(*flags), synthetic_config("--method", "PLOP")
    assert by_flags.methods == by_method.methods
    assert by_flags.label_protocol == by_method.label_protocol == "plop"


@pytest.mark.usefixtures("option_workdir")
@pytest.mark.parametrize("argv, expected", [
    (["--pseudo", "threshold_5"], "threshold_0.5"),
    (["--pseudo", "entropy_0.5"], "used no pseudo-labels at all"),
    (["--pseudo", "softmax"], "--pseudo softmax: unknown"),
    (["--pseudo", "entropy", "--unce"], "both replace the cross-entropy"),
    (["--pod_logits"], "add --pod local"),
    (["--pod", "local", "--pod_options", "{not json"], "--pod_options"),
    (["--pod", "local", "--pod_options", '{"switch": {"after": {"apply_mask": "background"}}}'], "apply_mask"),
    (["--pod", "local", "--spp_scales", "1", "0"], "--spp_scales 1 0"),
    (["--pseudo", "entropy", "--pseudo_nb_bins", "0"], "--pseudo_nb_bins 0"),
    (["--pod", "local", "--pod_factor", "-1"], "--pod_factor"),
    (["--pod", "local", "--crop_size", "48"], "--crop_size 48: POD's 4x4 grid"),
])
def test_option_mistakes_are_refused_with_one_line(argv, expected):
    assert expected in usage_error(["--task", "15-5", "--step", "1", *argv])


def _step_one(*argv):
    config = synthetic_config("--method", "PLOP", *argv)
    return config, step_methods(config, 1, num_old_channels=OLD, num_channels=OLD + NEW)


def _batch(generator):
    labels = torch.randint(OLD, OLD + NEW, (B, H, W), generator=generator)
    labels[:, : H // 2] = 0  # background at the top; the old classes are background in training
    labels[0, 0, :4] = 3
    labels[1, -1, -3:] = 255
    labels[1, H // 2:, : W // 2] = 0
    old_logits = 4 * torch.randn(B, OLD, H, W, generator=generator, dtype=torch.float64)
    logits = torch.randn(B, OLD + NEW, H, W, generator=generator, dtype=torch.float64)
    features = {name: torch.randn(B, channels, 8, 8, generator=generator, dtype=torch.float64)
                for name, channels in MAPS.items()}
    old_features = {name: value + 0.1 * torch.randn(value.shape, generator=generator, dtype=torch.float64)
                    for name, value in features.items()}
    features["logits_small"] = torch.randn(B, OLD + NEW, 4, 4, generator=generator, dtype=torch.float64)
    old_features["logits_small"] = torch.randn(B, OLD, 4, 4, generator=generator, dtype=torch.float64)
    return StepOutputs(labels, logits, old_logits, features, old_features)


def _uncertainty(old_logits):
    """The spec's u = H(p) / (C_old ln C_old ln C_t), per pixel, by its formula."""
    p = old_logits.softmax(dim=1)
    entropy = -(p * torch.log(p + 1e-8)).sum(dim=1)
    return entropy / (OLD * math.log(OLD) * math.log(OLD + NEW))


def test_step1_loss_is_ce_on_pseudo_labels_times_nu_plus_local_pod():
    config, methods = _step_one()
    assert methods.needs_old_model
    assert methods.feature_names == {*MAPS, "logits_small"}
    outputs = _batch(torch.Generator().manual_seed(0))
    u = _uncertainty(outputs.old_logits)
    # Halfway between two pixels' values, so that rounding decides no pixel.
    middle = u.flatten().sort().values[u.numel() // 2 - 1: u.numel() // 2 + 1]
    thresholds = torch.full((OLD + NEW,), float(middle.mean()), dtype=torch.float64)
    (plop,) = [method for method in methods.methods if isinstance(method, PLOP)]
    plop.set_thresholds(thresholds)

    total, components = methods.loss(outputs)

    predicted = outputs.old_logits.argmax(dim=1)
    background = outputs.labels < OLD
    accepted = background & (u < thresholds[predicted])
    targets = outputs.labels.clone()
    targets[background & ~accepted] = 255
    targets[accepted] = predicted[accepted]
    # nu in float32, as the original computes it (spec §5.7.4)
    nu = (accepted.flatten(1).sum(1).float() / (background.flatten(1).sum(1).float() + 1e-6)).double()
    assert 0 < nu.min() and nu.max() < 1  # the example exercises the factor
    per_pixel = F.cross_entropy(outputs.logits, targets, ignore_index=255, reduction="none")
    cross_entropy = (per_pixel * nu.view(B, 1, 1)).sum() / per_pixel.numel()  # ignored pixels count
    names = ["stage2", "stage3", "stage4", "stage5", "pre_logits", "logits_small"]
    settings = pod_settings("local", 0.01, PLOP_POD_OPTIONS, "pow", (1, 2, 4), False)
    pod = pod_loss([outputs.old_features[name] for name in names], [outputs.features[name] for name in names],
                   settings, num_channels=OLD + NEW, num_new_channels=NEW)
    torch.testing.assert_close(components["loss_cls"], cross_entropy, rtol=1e-12, atol=0)
    torch.testing.assert_close(components["loss_pod"], pod, rtol=1e-12, atol=0)
    torch.testing.assert_close(total, cross_entropy + pod, rtol=1e-12, atol=0)
    assert set(components) == {"loss_cls", "loss_pod", "loss"}


def test_thresholds_pass_counts_background_pixels_per_predicted_class():
    _, methods = _step_one()
    (data_pass,) = methods.data_passes()
    outputs = _batch(torch.Generator().manual_seed(1))
    counts = data_pass.new_counts(torch.device("cpu"))
    assert counts.shape == (OLD + NEW, 100) and counts.dtype == torch.int64
    data_pass.add_batch(counts, outputs.labels, outputs.old_logits)
    data_pass.add_batch(counts, outputs.labels, outputs.old_logits)

    u = _uncertainty(outputs.old_logits)
    predicted = outputs.old_logits.argmax(dim=1)
    counted = outputs.labels == 0  # the original's pass counts label 0 only (training relabels < C_old)
    expected = torch.zeros(OLD + NEW, 100, dtype=torch.int64)
    for c, k in zip(predicted[counted].tolist(), (u[counted] * 100).floor().clamp(max=99).long().tolist()):
        expected[c, k] += 2
    assert torch.equal(counts, expected)

    data_pass.finish(counts)
    (plop,) = [method for method in methods.methods if isinstance(method, PLOP)]
    assert plop.thresholds.shape == (OLD + NEW,) and (plop.thresholds >= 0.001).all()
    assert methods.state_dict() == {"plop": {"thresholds": plop.thresholds}}


def test_in_step_state_holds_the_thresholds():
    _, methods = _step_one()
    _, resumed = _step_one()
    (plop,) = [method for method in methods.methods if isinstance(method, PLOP)]
    plop.set_thresholds(torch.linspace(0.001, 0.02, OLD + NEW, dtype=torch.float64))
    resumed.load_state_dict(methods.state_dict())
    (restored,) = [method for method in resumed.methods if isinstance(method, PLOP)]
    assert torch.equal(restored.thresholds, plop.thresholds)
    with pytest.raises(ValueError, match="no 'plop' state"):
        resumed.load_state_dict({})


def test_step0_trains_plain_cross_entropy():
    config = synthetic_config("--method", "PLOP")
    methods = step_methods(config, 0, num_old_channels=0, num_channels=OLD)
    assert not methods.needs_old_model and not methods.feature_names and not methods.data_passes()
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(B, OLD, H, W, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, OLD, (B, H, W), generator=generator)
    labels[0, 0] = 255
    total, _ = methods.loss(StepOutputs(labels, logits))
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    torch.testing.assert_close(total, per_pixel.sum() / per_pixel.numel(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("pseudo", ["naive", "confidence", "threshold_0.5"])
def test_pseudo_modes_without_thresholds_need_no_pass(pseudo):
    _, methods = _step_one("--pseudo", pseudo)
    assert not methods.data_passes() and methods.state_dict() == {}
    total, _ = methods.loss(_batch(torch.Generator().manual_seed(3)))
    assert torch.isfinite(total)
