"""Losses against slow per-pixel transcriptions of their formulas (float64, plain softmax/log)."""
import math

import pytest
import torch
import torch.nn.functional as F

from segmentation.losses import (
    BCEDistillationLoss,
    BCEWithIgnoreLoss,
    KnowledgeDistillationLoss,
    UnbiasedCrossEntropy,
    UnbiasedKnowledgeDistillationLoss,
)

B, C, H, W = 2, 5, 3, 3
OLD_CL = 3  # channels 0..2 old (background included), 3..4 new
IGNORE = 255
REDUCTIONS = ("mean", "sum", "none")


def make_logits(channels=C, scale=3.0, dtype=torch.float64):
    return (scale * torch.randn(B, channels, H, W)).to(dtype)


def make_labels():
    labels = torch.randint(0, C, (B, H, W))
    labels[0, 0, 0] = IGNORE
    labels[1, 2, 1] = IGNORE
    labels[1, 0, 0] = 4  # at least one new-class and one old-foreground pixel
    labels[1, 0, 1] = 1
    return labels


def reduce_like(per_pixel, reduction):
    if reduction == "mean":
        return per_pixel.sum() / per_pixel.numel()  # ignored pixels are zeros in the denominator
    if reduction == "sum":
        return per_pixel.sum()
    return per_pixel


def pixels():
    for b in range(B):
        for i in range(H):
            for j in range(W):
                yield b, i, j


def slow_unbiased_ce(logits, labels, old_cl):
    out = torch.zeros(B, H, W, dtype=torch.float64)
    for b, i, j in pixels():
        y = int(labels[b, i, j])
        if y == IGNORE:
            continue
        p = torch.exp(logits[b, :, i, j]) / torch.exp(logits[b, :, i, j]).sum()
        out[b, i, j] = -torch.log(p[:old_cl].sum()) if y < old_cl else -torch.log(p[y])
    return out


def slow_kd(logits, old_logits, alpha):
    n_old = old_logits.shape[1]
    out = torch.zeros(B, H, W, dtype=torch.float64)
    for b, i, j in pixels():
        z = logits[b, :n_old, i, j]
        p = torch.exp(z) / torch.exp(z).sum()
        q = torch.exp(alpha * old_logits[b, :, i, j]) / torch.exp(alpha * old_logits[b, :, i, j]).sum()
        out[b, i, j] = -sum(q[c] * torch.log(p[c]) for c in range(n_old)) / n_old
    return out


def slow_unbiased_kd(logits, old_logits, alpha):
    n_old = old_logits.shape[1]
    out = torch.zeros(B, H, W, dtype=torch.float64)
    for b, i, j in pixels():
        p = torch.exp(logits[b, :, i, j]) / torch.exp(logits[b, :, i, j]).sum()
        q = torch.exp(alpha * old_logits[b, :, i, j]) / torch.exp(alpha * old_logits[b, :, i, j]).sum()
        p_background = p[0] + p[n_old:].sum()
        total = q[0] * torch.log(p_background) + sum(q[c] * torch.log(p[c]) for c in range(1, n_old))
        out[b, i, j] = -total / n_old
    return out


def binary_ce(z, t):
    s = 1.0 / (1.0 + math.exp(-z))
    return -(t * math.log(s) + (1.0 - t) * math.log(1.0 - s))


def slow_bce_with_ignore(logits, labels):
    out = torch.zeros(B, H, W, dtype=torch.float64)
    for b, i, j in pixels():
        y = int(labels[b, i, j])
        if y == IGNORE:
            continue
        out[b, i, j] = sum(binary_ce(float(logits[b, c, i, j]), float(c == y)) for c in range(C))
    return out


def slow_bce_distillation(logits, old_logits):
    n_old = old_logits.shape[1]
    total = 0.0
    for b, i, j in pixels():
        for c in range(n_old):
            target = 1.0 / (1.0 + math.exp(-float(old_logits[b, c, i, j])))
            total += binary_ce(float(logits[b, c, i, j]), target)
    return torch.tensor(n_old * total / (B * n_old * H * W), dtype=torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbiased_ce_matches_formula(reduction):
    logits, labels = make_logits(), make_labels()
    loss = UnbiasedCrossEntropy(OLD_CL, reduction=reduction, ignore_index=IGNORE)(logits, labels)
    expected = reduce_like(slow_unbiased_ce(logits, labels, OLD_CL), reduction)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", (1.0, 0.5))
def test_kd_matches_formula(reduction, alpha):
    logits, old_logits = make_logits(), make_logits(OLD_CL)
    loss = KnowledgeDistillationLoss(reduction=reduction, alpha=alpha)(logits, old_logits)
    torch.testing.assert_close(loss, reduce_like(slow_kd(logits, old_logits, alpha), reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", (1.0, 0.5))
def test_unbiased_kd_matches_formula(reduction, alpha):
    logits, old_logits = make_logits(), make_logits(OLD_CL)
    loss = UnbiasedKnowledgeDistillationLoss(reduction=reduction, alpha=alpha)(logits, old_logits)
    torch.testing.assert_close(loss, reduce_like(slow_unbiased_kd(logits, old_logits, alpha), reduction))


@pytest.mark.parametrize("loss_cls, slow", [
    (KnowledgeDistillationLoss, slow_kd),
    (UnbiasedKnowledgeDistillationLoss, slow_unbiased_kd),
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_distillation_mask_zeroes_pixels_but_keeps_denominator(loss_cls, slow, reduction):
    logits, old_logits = make_logits(), make_logits(OLD_CL)
    mask = torch.rand(B, H, W) > 0.4
    loss = loss_cls(reduction=reduction)(logits, old_logits, mask=mask)
    expected = reduce_like(slow(logits, old_logits, 1.0) * mask, reduction)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_ignore_matches_formula(reduction):
    logits, labels = make_logits(), make_labels()
    loss = BCEWithIgnoreLoss(ignore_index=IGNORE, reduction=reduction)(logits, labels)
    torch.testing.assert_close(loss, reduce_like(slow_bce_with_ignore(logits, labels), reduction))


def test_bce_distillation_matches_formula():
    logits, old_logits = make_logits(), make_logits(OLD_CL)
    loss = BCEDistillationLoss()(logits, old_logits)
    torch.testing.assert_close(loss, slow_bce_distillation(logits, old_logits))


def test_unbiased_ce_with_one_old_channel_is_plain_ce():
    logits, labels = make_logits(), make_labels()
    loss = UnbiasedCrossEntropy(old_cl=1, reduction="none")(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none"))


def test_unbiased_ce_maps_old_labels_to_background():
    logits, labels = make_logits(), make_labels()
    as_background = torch.where(labels < OLD_CL, torch.zeros_like(labels), labels)
    loss = UnbiasedCrossEntropy(OLD_CL, reduction="none")
    torch.testing.assert_close(loss(logits, labels), loss(logits, as_background))


def test_unbiased_kd_without_new_channels_is_kd():
    logits, old_logits = make_logits(OLD_CL), make_logits(OLD_CL)
    mask = torch.rand(B, H, W) > 0.5
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            UnbiasedKnowledgeDistillationLoss(reduction=reduction)(logits, old_logits, mask),
            KnowledgeDistillationLoss(reduction=reduction)(logits, old_logits, mask),
        )


@pytest.mark.parametrize("loss", [UnbiasedCrossEntropy(OLD_CL), BCEWithIgnoreLoss()])
def test_labels_are_not_modified(loss):
    logits, labels = make_logits(), make_labels()
    before = labels.clone()
    loss(logits, labels)
    assert torch.equal(labels, before)


def small_inputs():
    # gradcheck is slow per element: one image, 2x2 pixels.
    logits = torch.randn(1, C, 2, 2, dtype=torch.float64, requires_grad=True)
    old_logits = torch.randn(1, OLD_CL, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 4], [IGNORE, 1]]])
    return logits, old_logits, labels


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck_label_losses(reduction):
    logits, _, labels = small_inputs()
    for loss in (UnbiasedCrossEntropy(OLD_CL, reduction=reduction), BCEWithIgnoreLoss(reduction=reduction)):
        assert torch.autograd.gradcheck(lambda z: loss(z, labels), (logits,))


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck_distillation_losses(reduction):
    logits, old_logits, _ = small_inputs()
    mask = torch.tensor([[[True, False], [True, True]]])
    for loss in (KnowledgeDistillationLoss(reduction, alpha=0.7), UnbiasedKnowledgeDistillationLoss(reduction)):
        assert torch.autograd.gradcheck(lambda z, z_old: loss(z, z_old, mask), (logits, old_logits))
    assert torch.autograd.gradcheck(BCEDistillationLoss(), (logits, old_logits))


def all_losses_on(logits, old_logits, labels):
    return [
        UnbiasedCrossEntropy(OLD_CL)(logits, labels),
        BCEWithIgnoreLoss()(logits, labels),
        KnowledgeDistillationLoss()(logits, old_logits),
        UnbiasedKnowledgeDistillationLoss()(logits, old_logits),
        BCEDistillationLoss()(logits, old_logits),
    ]


def test_extreme_logits_give_finite_loss_and_gradient():
    signs = torch.randint(0, 2, (B, C, H, W)).float() * 2 - 1
    old_signs = torch.randint(0, 2, (B, OLD_CL, H, W)).float() * 2 - 1
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for loss_index in range(5):
            logits = (1e4 * signs).to(dtype).requires_grad_()
            old_logits = (1e4 * old_signs).to(dtype)
            loss = all_losses_on(logits, old_logits, make_labels())[loss_index]
            loss.backward()
            assert loss.dtype == torch.float32
            assert torch.isfinite(loss), (dtype, loss_index)
            assert torch.isfinite(logits.grad).all(), (dtype, loss_index)


def test_bf16_autocast_gives_finite_float32_loss_and_gradient():
    head = torch.nn.Conv2d(4, C, kernel_size=1)
    old_head = torch.nn.Conv2d(4, OLD_CL, kernel_size=1)
    features = 1e3 * torch.randn(B, 4, H, W)
    for loss_index in range(5):
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(features)
            with torch.no_grad():
                old_logits = old_head(features)
            assert logits.dtype == torch.bfloat16
            loss = all_losses_on(logits, old_logits, make_labels())[loss_index]
        loss.backward()
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss), loss_index
        assert torch.isfinite(head.weight.grad).all() and torch.isfinite(head.bias.grad).all(), loss_index


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="reduction"):
        KnowledgeDistillationLoss(reduction="avg")
    with pytest.raises(ValueError, match="old_cl"):
        UnbiasedCrossEntropy(old_cl=0)
    with pytest.raises(ValueError, match="old_cl"):
        UnbiasedCrossEntropy(old_cl=C + 1)(make_logits(), make_labels())
    with pytest.raises(ValueError, match="channels"):
        UnbiasedKnowledgeDistillationLoss()(make_logits(OLD_CL), make_logits(C))
    with pytest.raises(ValueError, match="mask"):
        KnowledgeDistillationLoss()(make_logits(), make_logits(OLD_CL), mask=torch.ones(B, H, W + 1, dtype=torch.bool))
