"""Loss of each method, as the step's active methods combine it, checked against direct per-pixel formulas."""
import math

import pytest
import torch

from option_helpers import synthetic_config
from segmentation.methods.step_methods import StepOutputs, step_methods

B, H, W = 2, 3, 4
OLD, NEW = 3, 2  # channels at step t-1 (background included) and channels added at step t


def _options(**overrides):
    values = dict(unce=False, unkd=False, init_balanced=False, loss_kd=0.0, loss_de=0.0, icarl=False,
                  icarl_importance=1.0, alpha=1.0, bce=False, icarl_disjoint=False, icarl_bkg=False,
                  regularizer=None, estimate_importance=[])
    values.update(overrides)
    return synthetic_config(**values)


class _Loss:
    """The loss of the active methods of a step with ``num_old_channels`` old channels."""

    def __init__(self, opts, num_old_channels):
        self.methods = step_methods(opts, 1 if num_old_channels else 0, num_old_channels, OLD + NEW)
        self.needs_old_model = self.methods.needs_old_model
        self.needs_features = self.methods.needs_features

    def __call__(self, logits, labels, old_logits=None, features=None, old_features=None):
        return self.methods.loss(StepOutputs(labels, logits, old_logits, features, old_features))


def _data(seed=0, channels=OLD + NEW):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, channels, H, W, generator=generator)
    old_logits = torch.randn(B, OLD, H, W, generator=generator)
    labels = torch.randint(0, channels, (B, H, W), generator=generator)
    labels[0, 0, 0] = 255
    return logits, old_logits, labels


def _per_pixel(function, logits, labels=None, old=None):
    """Mean over all B*H*W pixels of ``function(z, y, z_old)`` (ignored pixels count as 0)."""
    total = 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                y = None if labels is None else int(labels[b, i, j])
                if y == 255:
                    continue
                z_old = None if old is None else old[b, :, i, j].double()
                total += function(logits[b, :, i, j].double(), y, z_old)
    return total / (B * H * W)


def _ce(z, y, _):
    return float(torch.logsumexp(z, 0) - z[y])


def _kd(z, _, z_old):
    q = torch.softmax(z_old, 0)
    log_p = torch.log_softmax(z[:OLD], 0)
    return float(-(q * log_p).sum() / OLD)


def _unkd(z, _, z_old):
    q = torch.softmax(z_old, 0)
    norm = torch.logsumexp(z, 0)
    log_bg = torch.logsumexp(torch.cat([z[:1], z[OLD:]]), 0) - norm
    log_p = torch.cat([log_bg.view(1), z[1:OLD] - norm])
    return float(-(q * log_p).sum() / OLD)


def _unce(z, y, _):
    norm = torch.logsumexp(z, 0)
    if y < OLD:
        return float(norm - torch.logsumexp(z[:OLD], 0))
    return float(norm - z[y])


def _bce(z, y, _):
    target = torch.zeros_like(z)
    target[y] = 1
    return float(torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="sum"))


def test_step0_is_plain_cross_entropy_averaged_over_all_pixels():
    logits, _, labels = _data(channels=OLD)
    loss = _Loss(_options(unce=True, unkd=True, loss_kd=10, loss_de=5), num_old_channels=0)
    assert not loss.needs_old_model and not loss.needs_features
    total, parts = loss(logits, labels)
    assert total.item() == pytest.approx(_per_pixel(_ce, logits, labels), rel=1e-5)
    assert set(parts) == {"loss", "loss_cls"}


def test_ft_at_step1_has_no_distillation():
    logits, _, labels = _data()
    loss = _Loss(_options(), num_old_channels=OLD)
    assert not loss.needs_old_model
    total, _ = loss(logits, labels)
    assert total.item() == pytest.approx(_per_pixel(_ce, logits, labels), rel=1e-5)


def test_lwf_adds_weighted_kd_on_old_channels():
    logits, old_logits, labels = _data()
    loss = _Loss(_options(loss_kd=100.0), num_old_channels=OLD)
    assert loss.needs_old_model and not loss.needs_features
    total, parts = loss(logits, labels, old_logits)
    expected_kd = 100.0 * _per_pixel(_kd, logits, old=old_logits)
    assert parts["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert total.item() == pytest.approx(_per_pixel(_ce, logits, labels) + expected_kd, rel=1e-5)


def test_mib_uses_unbiased_ce_and_unbiased_kd():
    logits, old_logits, labels = _data()
    loss = _Loss(_options(unce=True, unkd=True, loss_kd=10.0), num_old_channels=OLD)
    total, parts = loss(logits, labels, old_logits)
    expected_cls = _per_pixel(_unce, logits, labels)
    expected_kd = 10.0 * _per_pixel(_unkd, logits, old=old_logits)
    assert parts["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert parts["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert total.item() == pytest.approx(expected_cls + expected_kd, rel=1e-5)


def test_ilt_adds_feature_mse_on_body_output():
    logits, old_logits, labels = _data()
    generator = torch.Generator().manual_seed(3)
    body = torch.randn(B, 8, 2, 2, generator=generator)
    old_body = torch.randn(B, 8, 2, 2, generator=generator)
    loss = _Loss(_options(loss_kd=100.0, loss_de=100.0), num_old_channels=OLD)
    assert loss.needs_old_model and loss.needs_features
    total, parts = loss(logits, labels, old_logits, {"body": body}, {"body": old_body})
    expected_de = 100.0 * float(((body - old_body) ** 2).mean())
    assert parts["loss_de"].item() == pytest.approx(expected_de, rel=1e-5)
    expected = _per_pixel(_ce, logits, labels) + 100.0 * _per_pixel(_kd, logits, old=old_logits) + expected_de
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_lwf_mc_bce_at_step0_and_bce_distillation_later():
    logits, old_logits, labels = _data(channels=OLD)
    step0 = _Loss(_options(icarl=True, icarl_importance=10.0), num_old_channels=0)
    assert not step0.needs_old_model
    total0, _ = step0(logits, labels)
    assert total0.item() == pytest.approx(_per_pixel(_bce, logits, labels), rel=1e-5)

    logits, old_logits, labels = _data()
    step1 = _Loss(_options(icarl=True, icarl_importance=10.0), num_old_channels=OLD)
    assert step1.needs_old_model
    total1, parts = step1(logits, labels, old_logits)
    # 10 * sum over old channels of the pixel-mean BCE towards the old sigmoid outputs.
    distill = 0.0
    for c in range(OLD):
        distill += float(torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, c].double(), torch.sigmoid(old_logits[:, c].double())))
    assert parts["loss_icarl"].item() == pytest.approx(10.0 * distill, rel=1e-5)
    assert total1.item() == pytest.approx(_per_pixel(_bce, logits, labels) + 10.0 * distill, rel=1e-5)
    assert math.isfinite(total1.item())


def test_bce_option_is_bce_without_distillation():
    logits, old_logits, labels = _data()
    loss = _Loss(_options(bce=True), num_old_channels=OLD)
    assert not loss.needs_old_model
    total, parts = loss(logits, labels)
    assert total.item() == pytest.approx(_per_pixel(_bce, logits, labels), rel=1e-5)
    assert set(parts) == {"loss", "loss_cls"}


@pytest.mark.parametrize("keep_background", [False, True])
def test_icarl_disjoint_replaces_old_channel_targets_by_old_sigmoids(keep_background):
    logits, old_logits, labels = _data()
    loss = _Loss(_options(icarl=True, icarl_importance=10.0, icarl_disjoint=True,
                                      icarl_bkg=keep_background), num_old_channels=OLD)
    assert loss.needs_old_model
    total, parts = loss(logits, labels, old_logits)
    first = 1 if keep_background else 0

    def disjoint_bce(z, y, z_old):
        target = torch.zeros_like(z)
        target[y] = 1
        target[first:OLD] = torch.sigmoid(z_old[first:])
        return float(torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="sum"))

    assert total.item() == pytest.approx(_per_pixel(disjoint_bce, logits, labels, old_logits), rel=1e-5)
    assert set(parts) == {"loss", "loss_cls"}  # no separate distillation term, no icarl_importance


def test_icarl_disjoint_at_step0_is_plain_bce():
    logits, _, labels = _data(channels=OLD)
    loss = _Loss(_options(icarl=True, icarl_disjoint=True), num_old_channels=0)
    assert not loss.needs_old_model
    assert loss(logits, labels)[0].item() == pytest.approx(_per_pixel(_bce, logits, labels), rel=1e-5)
