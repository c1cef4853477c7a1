import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from segmentation.models import DeepLabV3Head, IncrementalSegmenter, ResNet, build_model
from segmentation.models.norm import ABN, NORM_LAYERS, InPlaceABN, norm_act_layer

NORM_NAMES = sorted(NORM_LAYERS)


def _randomise_norms(model: nn.Module, positive_weight: bool = False) -> None:
    """Non-trivial norm parameters and running statistics, so that eval-mode tests see them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5) if positive_weight else module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)


# ---------------------------------------------------------------- backbone


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_resnet_output_shape(name, channels, output_stride):
    body = ResNet(name, ABN, output_stride)
    assert body.out_channels == channels
    with torch.no_grad():
        out = body(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, channels, 64 // output_stride, 96 // output_stride)


@pytest.mark.parametrize(
    "output_stride,strides,dilations", [(16, [1, 2, 2, 1], [1, 1, 1, 2]), (8, [1, 2, 1, 1], [1, 1, 2, 4])]
)
def test_resnet_strides_and_dilations(output_stride, strides, dilations):
    body = ResNet("resnet50", ABN, output_stride)
    assert body.mod1.conv1.stride == (2, 2) and body.mod1.pool1.stride == 2
    for index, (stride, dilation) in enumerate(zip(strides, dilations)):
        module = getattr(body, f"mod{index + 2}")
        for b, block in enumerate(module):
            conv1, conv2, conv3 = block.convs.conv1, block.convs.conv2, block.convs.conv3
            expected_stride = stride if b == 0 else 1
            assert conv2.stride == (expected_stride, expected_stride)
            assert conv2.dilation == (dilation, dilation) and conv2.padding == (dilation, dilation)
            assert conv1.stride == conv3.stride == (1, 1)
            assert conv1.dilation == conv3.dilation == (1, 1)
            if block.proj_conv is not None:
                assert block.proj_conv.stride == (expected_stride, expected_stride)


def test_resnet_bottleneck_layout_and_key_names():
    body = ResNet("resnet50", ABN, 16)
    keys = set(body.state_dict())
    for key in [
        "mod1.conv1.weight",
        "mod1.bn1.weight",
        "mod1.bn1.running_var",
        "mod2.block1.convs.conv1.weight",
        "mod2.block1.convs.bn1.running_mean",
        "mod2.block1.convs.conv3.weight",
        "mod2.block1.proj_conv.weight",
        "mod2.block1.proj_bn.weight",
        "mod5.block1.proj_bn.running_mean",
        "mod5.block3.convs.bn3.bias",
    ]:
        assert key in keys, key
    # Projection shortcuts only where the stride or the width changes: first block of each module.
    projections = sorted(k.rsplit(".", 2)[0] for k in keys if k.endswith("proj_conv.weight"))
    assert projections == ["mod2.block1", "mod3.block1", "mod4.block1", "mod5.block1"]
    assert [len(getattr(body, f"mod{i}")) for i in range(2, 6)] == [3, 4, 6, 3]
    assert all(not k.endswith(".bias") or ".bn" in k or "_bn" in k for k in keys), "convs have no bias"
    block = body.mod3.block2.convs
    activations = [block.bn1.activation, block.bn2.activation, block.bn3.activation]
    # The last norm activates after adding the shortcut it is given (act(BN(x) + shortcut)).
    assert activations == ["leaky_relu", "leaky_relu", "leaky_relu"]
    assert body.mod3.block1.proj_bn.activation == "identity"
    assert all(m.activation_param == 0.01 for m in body.modules() if isinstance(m, ABN))


def test_resnet_basic_block_layout():
    body = ResNet("resnet18", ABN, 16)
    assert body.mod2.block1.proj_conv is None  # 64 -> 64 channels, stride 1
    assert body.mod3.block1.proj_conv.weight.shape == (128, 64, 1, 1)
    assert list(dict(body.mod3.block2.convs.named_children())) == ["conv1", "bn1", "conv2", "bn2"]
    assert body.mod3.block2.convs.conv1.weight.shape == (128, 128, 3, 3)
    assert body.mod3.block2.convs.bn2.activation == "leaky_relu"


def test_resnet_block_matches_manual_computation():
    torch.manual_seed(1)
    body = ResNet("resnet18", ABN, 16).eval()
    _randomise_norms(body)
    block = body.mod3.block1
    x = torch.randn(2, 64, 9, 9)

    def bn(module, t):
        return F.batch_norm(
            t, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
        )

    convs = block.convs
    out = F.leaky_relu(bn(convs.bn1, F.conv2d(x, convs.conv1.weight, stride=2, padding=1)), 0.01)
    out = bn(convs.bn2, F.conv2d(out, convs.conv2.weight, padding=1))
    shortcut = bn(block.proj_bn, F.conv2d(x, block.proj_conv.weight, stride=2))
    expected = F.leaky_relu(out + shortcut, 0.01)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_resnet101_parameters_and_forward():
    body = ResNet("resnet101", ABN, 16)
    assert [len(getattr(body, f"mod{i}")) for i in range(2, 6)] == [3, 4, 23, 3]
    reference = torchvision.models.resnet101()
    reference_params = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in body.parameters()) == reference_params
    assert len(body.state_dict()) == len([k for k in reference.state_dict() if not k.startswith("fc.")])
    body.eval()
    with torch.no_grad():
        assert body(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 4, 4)


def test_resnet_rejects_unknown_options():
    with pytest.raises(ValueError, match="resnet101"):
        ResNet("resnet20", ABN, 16)
    with pytest.raises(ValueError, match="output_stride"):
        ResNet("resnet18", ABN, 32)


# ---------------------------------------------------------------- head


@pytest.mark.parametrize("output_stride,rates", [(16, (6, 12, 18)), (8, (12, 24, 32))])
def test_head_layout(output_stride, rates):
    head = DeepLabV3Head(512, ABN, output_stride)
    assert head.map_convs[0].kernel_size == (1, 1)
    assert [c.dilation[0] for c in head.map_convs[1:]] == list(rates)
    assert [c.padding[0] for c in head.map_convs[1:]] == list(rates)
    assert all(c.weight.shape[:2] == (256, 512) for c in head.map_convs)
    assert head.map_bn.num_features == 1024
    assert head.red_conv.weight.shape == (256, 1024, 1, 1)
    assert head.global_pooling_conv.weight.shape == (256, 512, 1, 1)
    assert head.pool_red_conv.weight.shape == (256, 256, 1, 1)
    assert head.red_bn.num_features == 256 and head.out_channels == 256
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Conv2d))
    norms = [head.map_bn, head.global_pooling_bn, head.red_bn]
    assert all(n.activation == "leaky_relu" and n.activation_param == 0.01 for n in norms)


def test_head_xavier_init():
    head = DeepLabV3Head(512, ABN, 16)
    gain = math.sqrt(2.0 / (1 + 0.01**2))
    for conv in [head.map_convs[1], head.red_conv]:
        fan_out, fan_in = conv.weight.shape[0] * conv.weight[0, 0].numel(), conv.weight[0].numel()
        expected_std = gain * math.sqrt(2.0 / (fan_in + fan_out))
        assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
        assert conv.weight.mean().abs().item() < 0.05 * expected_std


def _reference_local_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """Average over a k x k window, stride 1, replicate-padded: the window of output pixel i
    starts at clamp(i - (k - 1) // 2, 0, H - k)."""
    n, c, h, w = x.shape
    kh, kw = min(k, h), min(k, w)
    out = torch.empty_like(x)
    for i in range(h):
        top = min(max(i - (kh - 1) // 2, 0), h - kh)
        for j in range(w):
            left = min(max(j - (kw - 1) // 2, 0), w - kw)
            out[:, :, i, j] = x[:, :, top : top + kh, left : left + kw].mean(dim=(2, 3))
    return out


def _head_with_pool(head: DeepLabV3Head, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    out = head.red_conv(head.map_bn(torch.cat([conv(x) for conv in head.map_convs], dim=1)))
    pool = head.pool_red_conv(head.global_pooling_bn(head.global_pooling_conv(pooled)))
    return head.red_bn(out + pool)


@pytest.mark.parametrize("window", [3, 4])
def test_head_eval_local_pooling_matches_reference(window):
    head = DeepLabV3Head(16, ABN, 16, pooling_size=window).eval()
    _randomise_norms(head)
    x = torch.randn(2, 16, 6, 7)
    with torch.no_grad():
        expected = _head_with_pool(head, x, _reference_local_pool(x, window))
        assert torch.allclose(head(x), expected, atol=1e-5)
        global_out = _head_with_pool(head, x, x.mean(dim=(2, 3), keepdim=True))
        assert not torch.allclose(head(x), global_out, atol=1e-3)


def test_head_eval_pooling_equals_global_when_map_is_smaller_than_window():
    head = DeepLabV3Head(16, ABN, 16, pooling_size=8).eval()
    _randomise_norms(head)
    x = torch.randn(2, 16, 5, 8)
    with torch.no_grad():
        local = head(x)
        head.pooling_size = None
        global_pool = head(x)
        assert torch.allclose(local, global_pool, atol=1e-6)
        assert torch.allclose(global_pool, _head_with_pool(head, x, x.mean(dim=(2, 3), keepdim=True)), atol=1e-5)


def test_head_training_uses_global_pooling():
    head = DeepLabV3Head(16, ABN, 16, pooling_size=2).train()
    x = torch.randn(3, 16, 6, 6)
    expected = _head_with_pool(head, x, x.mean(dim=(2, 3), keepdim=True))
    assert torch.allclose(head(x), expected, atol=1e-5)


# ---------------------------------------------------------------- incremental model


def _model(classes, norm_act="abn", **kwargs):
    return build_model(classes, backbone="resnet18", norm_act=norm_act, **kwargs)


@pytest.mark.parametrize("norm_act", NORM_NAMES)
def test_segmenter_logits_in_step_order(norm_act):
    model = _model([16, 1, 1], norm_act).eval()
    assert model.classes == [16, 1, 1]
    assert [c.weight.shape for c in model.cls] == [(16, 256, 1, 1), (1, 256, 1, 1), (1, 256, 1, 1)]
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        logits, features = model(x, features=("body", "pre_logits"))
        assert torch.equal(model(x), logits)
    assert logits.shape == (2, 18, 64, 80)
    assert features["body"].shape == (2, 512, 4, 5)
    assert features["pre_logits"].shape == (2, 256, 4, 5)
    offset = 0
    for classifier in model.cls:
        expected = F.interpolate(
            classifier(features["pre_logits"]), size=(64, 80), mode="bilinear", align_corners=False
        )
        n = classifier.out_channels
        assert torch.allclose(logits[:, offset : offset + n], expected, atol=1e-6)
        offset += n


@pytest.mark.parametrize("norm_act", [n for n in NORM_NAMES if n != "abn"])
def test_inplace_norm_training_step_matches_abn(norm_act):
    """In-Place layers overwrite their input: the model must only feed them tensors nobody else needs."""
    torch.manual_seed(3)
    # float64 so that the comparison is tight: In-Place ABN recovers its input from its output.
    reference = _model([4, 2], "abn", output_stride=8).train().double()
    _randomise_norms(reference, positive_weight=True)
    model = _model([4, 2], norm_act, output_stride=8).train().double()
    state = reference.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, InPlaceABN):  # effective scale |w| + eps
            state[f"{name}.weight"] = state[f"{name}.weight"] - module.eps
    model.load_state_dict(state)

    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    target = torch.randn(2, 6, 48, 48, dtype=torch.float64)
    outputs = []
    for m in (reference, model):
        logits, features = m(x, features={"body"})
        ((logits * target).sum() + features["body"].sum()).backward()
        outputs.append(logits.detach())
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-7, atol=1e-8)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, ref_params[name].grad, rtol=1e-6, atol=1e-8), name
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        assert torch.allclose(buffer, ref_buffers[name], rtol=1e-7, atol=1e-9), name


def test_init_new_classifier_splits_background_probability():
    torch.manual_seed(2)
    old = _model([4, 2])
    with torch.no_grad():
        for classifier in old.cls:
            classifier.bias.uniform_(-1, 1)
    new = _model([4, 2, 3])
    result = new.load_state_dict(old.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["cls.2.bias", "cls.2.weight"] and not result.unexpected_keys
    new.init_new_classifier()

    old.eval()
    new.eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        p_old = old(x).softmax(dim=1)
        p_new = new(x).softmax(dim=1)
    assert torch.allclose(p_new[:, 1:6], p_old[:, 1:6], atol=1e-6)
    for channel in [0, 6, 7, 8]:
        assert torch.allclose(p_new[:, channel], p_old[:, 0] / 4, atol=1e-6)
    assert torch.allclose(new.cls[2].weight, old.cls[0].weight[0:1].expand(3, -1, -1, -1))
    assert torch.allclose(new.cls[0].bias[0], old.cls[0].bias[0] - math.log(4))
    assert torch.allclose(new.cls[0].bias[1:], old.cls[0].bias[1:])


def test_init_new_classifier_rejects_step_zero():
    with pytest.raises(RuntimeError, match="step"):
        _model([5]).init_new_classifier()


def test_fix_bn_freezes_norm_layers():
    model = _model([3]).train()
    model.fix_bn()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)
    assert all(not p.requires_grad for m in norms for p in m.parameters())
    assert all(p.requires_grad for p in model.cls.parameters())
    before = model.body.mod1.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.body.mod1.bn1.running_mean, before)


def test_segmenter_rejects_bad_classes():
    body = ResNet("resnet18", ABN, 16)
    head = DeepLabV3Head(512, ABN, 16)
    with pytest.raises(ValueError, match="classes"):
        IncrementalSegmenter(body, head, [])
    with pytest.raises(ValueError, match="classes"):
        IncrementalSegmenter(body, head, [3, 0])


def test_build_model_rejects_unknown_options():
    with pytest.raises(ValueError, match="backbone 'resnet20'.*resnet101"):
        build_model([3], backbone="resnet20")
    with pytest.raises(ValueError, match="output_stride 32"):
        build_model([3], backbone="resnet18", output_stride=32)
    with pytest.raises(ValueError, match="norm_act 'bn'"):
        build_model([3], backbone="resnet18", norm_act="bn")


def test_build_model_uses_requested_norm_and_pooling():
    model = build_model([3], backbone="resnet18", output_stride=8, norm_act="abn", pooling_size=None)
    assert type(model.body.mod1.bn1) is norm_act_layer("abn")
    assert model.head.pooling_size is None
    assert model.head.map_convs[3].dilation == (32, 32)
