"""Norm + residual add + activation in one layer (``norm(x, residual=shortcut)``) and the residual block built on it."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segmentation.models.norm import ABN, InPlaceABN
from segmentation.models.resnet import ResidualBlock

EPS = 1e-5


@pytest.mark.parametrize("layer_class", [InPlaceABN, ABN])
def test_layer_with_residual_matches_batchnorm_add_activation(kernels, layer_class):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    residual = torch.randn(4, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    layer = layer_class(3, activation_param=0.1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-1.5, 0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.3, 0.0, -0.4]))
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(layer.weight.abs() + EPS if layer_class is InPlaceABN else layer.weight)
        bn.bias.copy_(layer.bias)

    out = layer(x * 1, residual=residual)
    out.backward(grad_out)
    grads = (x.grad, residual.grad, layer.weight.grad.abs(), layer.bias.grad)
    x.grad = residual.grad = None
    expected = F.leaky_relu(bn(x * 1) + residual, 0.1)
    expected.backward(grad_out)

    torch.testing.assert_close(out, expected)
    for actual, wanted in zip(grads, (x.grad, residual.grad, bn.weight.grad.abs(), bn.bias.grad)):
        torch.testing.assert_close(actual, wanted)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    layer.eval(), bn.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, residual=residual), F.leaky_relu(bn(x) + residual, 0.1))


def test_residual_of_another_shape_is_rejected():
    with pytest.raises(ValueError, match="residual's shape"):
        InPlaceABN(3)(torch.randn(2, 3, 4, 4), residual=torch.randn(2, 3, 4, 5))


def unfused_block(block: ResidualBlock) -> nn.Module:
    """The same block computing BN -> add -> activation as three operations (identity last norm)."""
    reference = copy.deepcopy(block)
    last_name = list(dict(reference.convs.named_children()))[-1]
    last = getattr(reference.convs, last_name)
    unfused_norm = type(last)(last.num_features, activation="identity").to(last.weight.dtype)
    unfused_norm.load_state_dict(last.state_dict())
    setattr(reference.convs, last_name, unfused_norm)

    def forward(x):
        shortcut = x if reference.proj_conv is None else reference.proj_bn(reference.proj_conv(x))
        return F.leaky_relu(reference.convs(x) + shortcut, last.activation_param)

    reference.forward = forward
    return reference


def saved_storages(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("channels, in_channels, stride", [((4, 4, 16), 8, 2), ((4, 4, 16), 16, 1), ((6, 6), 6, 1)])
def test_fused_block_equals_unfused_block_in_float64(kernels, channels, in_channels, stride):
    torch.manual_seed(0)
    block = ResidualBlock(in_channels, channels, InPlaceABN, stride=stride).double().train()
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, InPlaceABN):
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    reference = unfused_block(block)
    x = torch.randn(3, in_channels, 7, 7, dtype=torch.float64)
    grad_out = torch.randn_like(block(x.clone()))
    block.load_state_dict(reference.state_dict())  # undo the running-statistics update of that call

    outputs, grads = [], []
    for module in (block, reference):
        inp = x.clone().requires_grad_(True)
        out = module(inp)
        out.backward(grad_out)
        outputs.append(out.detach())
        grads.append([inp.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    for fused_grad, unfused_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, unfused_grad, rtol=1e-9, atol=1e-9)
    for (name, fused_value), unfused_value in zip(block.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(fused_value, unfused_value, msg=name)

    # The fused block keeps neither the last norm's output nor the sum beside the block's output.
    assert saved_storages(block, x) < saved_storages(reference, x)
