"""Feature taps of the segmentation model (``model(x, features=names)``), as PLOP's distillation reads them:
the stage pre-activations, the head output and the stride-16 logits, with every norm layer."""
import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segmentation.models import build_model
from segmentation.models.norm import InPlaceABN
from segmentation.models.segmenter import FEATURE_NAMES, STAGE_FEATURE_NAMES

NORM_NAMES = ("abn", "iabn", "iabn_sync")
CLASSES = [16, 5]
SIZE = 32
# (channels, stride) of the stage taps of a ResNet-18 at output stride 16.
STAGE_LAYOUT = {"stage2": (64, 4), "stage3": (128, 8), "stage4": (256, 16), "stage5": (512, 16)}


@functools.lru_cache(maxsize=None)
def _built_model(norm_act: str) -> nn.Module:
    """A tiny model with non-trivial norm parameters and running statistics (positive weights, so
    that a plain-ABN copy can reproduce In-Place ABN's effective scale ``|weight| + eps``), built
    once per process from its own seed."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = build_model(CLASSES, backbone="resnet18", output_stride=16, norm_act=norm_act, pooling_size=2)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
    return model


def _model(norm_act: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    return copy.deepcopy(_built_model(norm_act)).to(dtype)


def _abn_copy(model: nn.Module) -> nn.Module:
    """A plain-ABN model computing the same function as ``model``."""
    reference = _model("abn", next(model.parameters()).dtype)
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, InPlaceABN):
            state[f"{name}.weight"] = module.weight.detach().abs() + module.eps
    reference.load_state_dict(state)
    return reference.train(model.training)


def _last_blocks(model: nn.Module) -> list:
    body = model.body
    return [list(getattr(body, f"mod{index}"))[-1] for index in (2, 3, 4, 5)]


def _input(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, dtype=dtype)


@pytest.mark.parametrize("norm_act", NORM_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_taps_leave_the_logits_bit_identical(norm_act, dtype):
    """Both In-Place ABN formulations run the same forward (``norm_kernels.forward_local``) on the CPU,
    so the reference one covers the fused one's eager form here."""
    model = _model(norm_act, dtype)
    x = _input(dtype)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            plain = model(x)
            tapped, maps = model(x, features=FEATURE_NAMES)
        assert torch.equal(plain, tapped), training
        assert set(maps) == set(FEATURE_NAMES)


@pytest.mark.parametrize("norm_act", NORM_NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_stage_taps_are_the_preactivations_of_the_last_blocks(norm_act, training):
    """Each stage tap equals ``BN(conv) + shortcut`` recomputed from the inputs of the last norm of
    the stage's last block in an untapped plain-ABN copy (whose input is not overwritten)."""
    model = _model(norm_act).train(training)
    reference = _abn_copy(model)
    expected = []

    def recompute(module, args, kwargs, output):
        running = (None, None) if module.training else (module.running_mean, module.running_var)
        normalised = F.batch_norm(args[0], *running, module.weight, module.bias, module.training, 0.0, module.eps)
        expected.append(normalised + kwargs["residual"])

    for block in _last_blocks(reference):
        block.convs[-1].register_forward_hook(recompute, with_kwargs=True)
    x = _input()
    with torch.no_grad():
        reference(x)
        _, maps = model(x, features=STAGE_FEATURE_NAMES)

    assert list(maps) == list(STAGE_FEATURE_NAMES)
    for (name, tap), wanted in zip(maps.items(), expected):
        channels, stride = STAGE_LAYOUT[name]
        assert tap.shape == (2, channels, SIZE // stride, SIZE // stride), name
        assert (tap < 0).any(), name  # a pre-activation: the leaky ReLU has not been applied
        torch.testing.assert_close(tap, wanted, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize(
    "norm_act, kernels",
    [("abn", "reference"), ("iabn", "reference"), ("iabn", "fused"), ("iabn_sync", "reference")],
    indirect=["kernels"],
)
def test_tap_gradients_match_plain_abn_and_the_taps_survive_backward(norm_act, kernels):
    """A loss on every tap and the logits gives the parameter gradients of a plain-ABN copy (float64,
    rtol 1e-6, atol 1e-8: In-Place ABN recovers its input from its output), and backward leaves the
    tapped tensors as the forward returned them: In-Place ABN did not overwrite them. Both backward
    formulations of In-Place ABN (reference, fused run eagerly)."""
    model = _model(norm_act).train()
    reference = _abn_copy(model)
    x = _input()
    target = torch.randn(2, sum(CLASSES), SIZE, SIZE, dtype=torch.float64)
    results = []
    for module in (model, reference):
        logits, maps = module(x, features=FEATURE_NAMES)
        returned = {name: tap.detach().clone() for name, tap in maps.items()}
        loss = (logits * target).sum() + sum(tap.pow(2).sum() for tap in maps.values())
        loss.backward()
        for name, tap in maps.items():
            assert torch.equal(tap.detach(), returned[name]), name
        results.append((logits.detach(), returned, {name: p.grad for name, p in module.named_parameters()}))

    (logits, maps, grads), (ref_logits, ref_maps, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-7, atol=1e-8)
    for name in FEATURE_NAMES:
        torch.testing.assert_close(maps[name], ref_maps[name], rtol=1e-7, atol=1e-8, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-8, msg=name)


def test_small_logits_are_the_logits_before_upsampling():
    model = _model("iabn", torch.float32).eval()
    x = _input(torch.float32)
    with torch.no_grad():
        logits, maps = model(x, features=["logits_small"])
    assert list(maps) == ["logits_small"]
    assert maps["logits_small"].shape == (2, sum(CLASSES), SIZE // 16, SIZE // 16)
    upsampled = F.interpolate(maps["logits_small"], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert torch.equal(upsampled, logits)


def test_stage_taps_run_only_when_requested():
    model = _model("iabn", torch.float32).eval()
    calls = []
    for block in _last_blocks(model):
        block.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    x = _input(torch.float32)
    with torch.no_grad():
        _, maps = model(x, features={"body", "pre_logits", "logits_small"})
        assert list(maps) == ["body", "pre_logits", "logits_small"]
        assert calls == [{}] * 4
        calls.clear()
        _, maps = model(x, features={"stage4"})
        assert list(maps) == ["stage4"]
        assert calls == [{"preactivation": True}] * 4


def test_unknown_feature_names_are_rejected():
    model = _model("abn", torch.float32)
    with pytest.raises(ValueError, match="valid: body, pre_logits, stage2, stage3, stage4, stage5, logits_small"):
        model(_input(torch.float32), features={"body", "attentions"})
    with pytest.raises(TypeError, match="collection of names"):
        model(_input(torch.float32), features="body")
