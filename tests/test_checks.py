"""Pieces of the checks before training: original checkpoints, the batch against the normalisation,
the penalty's learning-rate warning."""

import pytest
import torch

from segmentation.engine.original_checkpoint import adapt_checkpoint, convert_original_checkpoint, head_widths
from option_helpers import synthetic_config
from segmentation.engine.checks import check_training
from segmentation.errors import UsageError
from segmentation.methods import active_methods
from segmentation.methods.weight_penalty import nesterov_stability_limit
from segmentation.models import build_model

def _original(model, drop_buffers=True):
    state = model.state_dict()
    return {"epoch": 30, "optimizer_state": {}, "model_state": {
        "module." + key: value for key, value in state.items()
        if not (drop_buffers and key.endswith("num_batches_tracked"))}}


@pytest.mark.parametrize("norm_act", ["iabn", "abn"])
def test_original_checkpoint_gives_the_same_function(norm_act, tmp_path):
    classes = [16, 5]
    source = build_model(classes, backbone="resnet18", norm_act="iabn", pooling_size=None).eval()
    for module in source.modules():  # non-trivial statistics and scales, some negative
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.weight.data.uniform_(-1.5, 1.5)
    converted = convert_original_checkpoint(_original(source), "voc", "15-5", 1, norm_act, tmp_path / "o.pth")
    assert converted["classes"] == classes and converted["step"] == 1
    target = build_model(classes, backbone="resnet18", norm_act=norm_act, pooling_size=None).eval()
    target.load_state_dict(converted["model_state"], strict=True)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(image)[0], source(image)[0], rtol=1e-4, atol=1e-4)


def test_original_checkpoint_of_other_classes_is_refused(tmp_path):
    model = build_model([16], backbone="resnet18", norm_act="iabn")
    original = _original(model)
    assert head_widths({k[7:]: v for k, v in original["model_state"].items()}) == [16]
    with pytest.raises(ValueError, match=r"o\.pth.*\[16\].*\[20\]"):
        convert_original_checkpoint(original, "voc", "19-1", 0, "iabn", tmp_path / "o.pth")
    ours = {"classes": [16], "model_state": {}}
    assert adapt_checkpoint(ours, "voc", "15-5", 0, "iabn", tmp_path / "x.pth") == (ours, False)
    with pytest.raises(ValueError, match="neither"):
        adapt_checkpoint({"weights": 1}, "voc", "15-5", 0, "iabn", tmp_path / "x.pth")


@pytest.mark.parametrize("norm_act, batch_size, world_size, refused", [
    ("iabn_sync", 1, 1, True),   # one image in all
    ("iabn_sync", 1, 2, False),  # one image per process, two in the synchronised batch
    ("iabn", 1, 2, True),        # unsynchronised: each process normalises over one image
    ("abn", 2, 1, False),
])
def test_batch_size_against_normalisation(norm_act, batch_size, world_size, refused):
    config = synthetic_config(backbone="resnet18", test=False, norm_act=norm_act, batch_size=batch_size)
    if refused:
        with pytest.raises(UsageError, match="--batch_size 1"):
            check_training(config, world_size)
    else:
        check_training(config, world_size)
    check_training(config.replace(test=True), world_size)  # testing has no training batch


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_nesterov_stability_limit_is_where_pytorch_sgd_starts_to_diverge(momentum):
    curvature = 1000.0  # EWC's penalty 500 * w^2 at importance 1
    limit = nesterov_stability_limit(momentum)
    for lr, diverges in ((0.97 * limit / curvature, False), (1.03 * limit / curvature, True)):
        weight = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        optimizer = torch.optim.SGD([weight], lr=lr, momentum=momentum, nesterov=momentum > 0)
        for _ in range(2000):
            optimizer.zero_grad()
            (curvature / 2 * weight ** 2).sum().backward()
            optimizer.step()
        assert (abs(weight.item()) > 1) == diverges, (lr, weight.item())


def unstable_penalty_warning(opts):
    """The launch warnings of the active methods (at most one here), or None."""
    warnings = [warning for method in active_methods(opts) for warning in method.launch_warnings(opts)]
    assert len(warnings) <= 1
    return warnings[0] if warnings else None


def test_unstable_penalty_is_warned_about_with_the_learning_rate_that_works():
    # EWC and PI: 500 x importance <= 1, curvature 1000; limit 1.357 at momentum 0.9.
    warning = unstable_penalty_warning(synthetic_config("--method", "EWC", "--step", "all", "--lr", "0.01",
                                                      "--incremental_lr", "0.002"))
    assert "ewc penalty is unstable at step 1" in warning and "below 0.00136" in warning
    for safe in (["--step", "all", "--lr", "0.01", "--incremental_lr", "0.001"],  # the protocol
                 ["--step", "0", "--lr", "0.01"],  # no penalty at step 0
                 ["--step", "1", "--lr", "0.002", "--reg_no_normalize"]):  # importances unbounded: no claim
        assert unstable_penalty_warning(synthetic_config("--method", "PI", *safe)) is None, safe
    # RW: 100 x (Fisher + score) <= 200, curvature 400.
    assert unstable_penalty_warning(synthetic_config("--method", "RW", "--step", "1", "--lr", "0.003")) is None
    assert "below 0.00339" in unstable_penalty_warning(synthetic_config("--method", "RW", "--step", "1", "--lr", "0.004"))
    assert unstable_penalty_warning(synthetic_config("--method", "MiB", "--step", "1", "--lr", "1")) is None
