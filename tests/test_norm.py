import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from segmentation.models.norm import (
    ABN,
    NORM_LAYERS,
    InPlaceABN,
    InPlaceABNFunction,
    InPlaceABNSync,
    norm_act_layer,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 1e-5


BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def reference_layer(iabn: InPlaceABN, ndim: int = 4) -> nn.Sequential:
    """PyTorch batch norm with weight |gamma| + eps, then the activation (for ``ndim``-D inputs)."""
    bn = BATCH_NORMS[ndim](iabn.num_features, eps=iabn.eps, momentum=iabn.momentum)
    with torch.no_grad():
        bn.weight.copy_(iabn.weight.abs() + iabn.eps)
        bn.bias.copy_(iabn.bias)
    if iabn.activation == "leaky_relu":
        return nn.Sequential(bn, nn.LeakyReLU(iabn.activation_param))
    return nn.Sequential(bn)


def make_iabn(cls=InPlaceABN, num_features: int = 3, **kwargs) -> InPlaceABN:
    layer = cls(num_features, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1.5, 2.0, num_features))  # includes negative gammas
        layer.bias.copy_(torch.linspace(0.3, -0.4, num_features))
    return layer


# --------------------------------------------------------------------------------------------
# Gradients of the autograd Function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("shape, affine, residual", [
    ((3, 2, 3, 3), True, False),
    ((6, 2), True, False),
    ((3, 2, 3, 3), True, True),  # norm + residual add + activation in one layer
    ((4, 2, 2, 2), False, False),
])
def test_function_gradcheck(kernels, activation, shape, affine, residual):
    """float64 gradients of the reference operations and of the fused formulation (``kernels``)."""
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    inputs = [x]
    if affine:
        inputs += [torch.tensor([0.8, -1.3], dtype=torch.float64, requires_grad=True),
                   torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)]
    if residual:
        inputs.append(torch.randn(shape, dtype=torch.float64, requires_grad=True))

    def function(x, weight=None, bias=None, shortcut=None):
        # clone: the Function overwrites its input, which must not be gradcheck's leaf.
        return InPlaceABNFunction.apply(x.clone(), weight, bias, EPS, activation, 0.1, None, shortcut)[0]

    assert torch.autograd.gradcheck(function, tuple(inputs))


# --------------------------------------------------------------------------------------------
# Equivalence with BatchNorm + leaky ReLU
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, channels_last, activation, momentum",
    [
        ((4, 3, 5, 6), False, "leaky_relu", 0.1),
        ((4, 3, 5, 6), True, "leaky_relu", 0.1),
        ((4, 3, 5, 6), False, "identity", None),
        ((8, 3), False, "leaky_relu", 0.3),
        ((2, 3, 4, 3, 2), False, "leaky_relu", 0.1),
    ],
)
def test_iabn_matches_batchnorm_plus_leaky_relu(shape, channels_last, activation, momentum):
    iabn = make_iabn(activation=activation, momentum=momentum)
    reference = reference_layer(iabn, len(shape))
    for step in range(3):
        x = torch.randn(shape) * (1 + step) + step
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        grad_output = torch.randn(shape)
        x_iabn = x.clone().requires_grad_(True)
        x_ref = x.clone().requires_grad_(True)
        iabn.zero_grad()
        reference.zero_grad()

        out = iabn(x_iabn * 1.0)  # the product is a non-leaf the layer may overwrite
        expected = reference(x_ref)
        out.backward(grad_output)
        expected.backward(grad_output)

        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_iabn.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
        # d|gamma|/dgamma = sign(gamma)
        expected_weight_grad = reference[0].weight.grad * iabn.weight.sign()
        torch.testing.assert_close(iabn.weight.grad, expected_weight_grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(iabn.bias.grad, reference[0].bias.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(iabn.running_mean, reference[0].running_mean)
        torch.testing.assert_close(iabn.running_var, reference[0].running_var)
        assert iabn.num_batches_tracked.item() == step + 1
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last)

    iabn.eval()
    reference.eval()
    x = torch.randn(shape) + 0.5
    x_iabn = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    out = iabn(x_iabn)
    expected = reference(x_ref)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x_iabn.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_iabn, x)  # eval mode leaves the input alone


def test_iabn_matches_hand_computed_values():
    # One channel, values -1 and 1: mean 0, biased variance 1, x_hat = x / sqrt(1 + eps).
    layer = InPlaceABN(1)
    with torch.no_grad():
        layer.weight.fill_(-2.0)  # effective scale |-2| + eps
        layer.bias.fill_(0.5)
    out = layer(torch.tensor([[-1.0], [1.0]]))
    x_hat = 1 / (1 + EPS) ** 0.5
    scale = 2 + EPS
    expected = torch.tensor([[0.01 * (0.5 - scale * x_hat)], [0.5 + scale * x_hat]])
    torch.testing.assert_close(out, expected)
    # running var: 0.9 * 1 + 0.1 * unbiased variance 2
    torch.testing.assert_close(layer.running_var, torch.tensor([1.1]))
    torch.testing.assert_close(layer.running_mean, torch.tensor([0.0]))


def test_sync_without_process_group_is_plain_iabn():
    plain, synced = make_iabn(), make_iabn(InPlaceABNSync)
    x = torch.randn(4, 3, 5, 5)
    grad_output = torch.randn(4, 3, 5, 5)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [plain(xs[0] * 1.0), synced(xs[1] * 1.0)]
    for out in outs:
        out.backward(grad_output)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=0)
    torch.testing.assert_close(plain.weight.grad, synced.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(plain.running_var, synced.running_var, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# In-place behaviour and memory
# --------------------------------------------------------------------------------------------


def test_training_forward_overwrites_its_input():
    layer = make_iabn()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    features = x * 2.0
    before = features.detach().clone()
    out = layer(features)
    assert out.data_ptr() == features.data_ptr()
    assert torch.equal(features, out)
    assert not torch.allclose(features, before)
    out.sum().backward()  # the version bump is legitimate: autograd accepts it
    assert x.grad is not None and torch.isfinite(x.grad).all()


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[int, list[int]]:
    """Bytes autograd keeps for the backward of ``layer(x)`` and the data pointers of full-size saves."""
    total, full_size_pointers = 0, []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        if tensor.numel() == x.numel():
            full_size_pointers.append(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    return total, full_size_pointers


def test_iabn_saves_only_its_output():
    shape = (4, 8, 16, 16)
    activation_bytes = torch.Size(shape).numel() * 4
    leaf = torch.randn(shape, requires_grad=True)

    abn_bytes, abn_full = saved_bytes(ABN(8), leaf * 1.0)
    features = leaf * 1.0
    iabn_bytes, iabn_full = saved_bytes(InPlaceABN(8), features)

    assert abn_bytes >= 2 * activation_bytes  # BN input and BN output (leaky ReLU input)
    assert len(abn_full) == 2
    assert iabn_full == [features.data_ptr()]  # the overwritten input, i.e. the output
    assert activation_bytes <= iabn_bytes < activation_bytes + 1024  # plus a few per-channel vectors


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    conv_in, conv_out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
    layer = make_iabn(num_features=8)
    x = torch.randn(4, 3, 12, 12) * 5 + 20  # a large offset stresses the precision of the statistics
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv_in(x)
        assert features.dtype == torch.bfloat16
        reference = reference_layer(layer)(features.detach().float())
        normalised = layer(features)
        out = conv_out(normalised)
    assert normalised.dtype == torch.bfloat16
    assert torch.isfinite(normalised).all()
    torch.testing.assert_close(normalised.float(), reference, atol=0.05, rtol=0.02)
    out.float().square().mean().backward()
    for tensor in (x.grad, layer.weight.grad, layer.bias.grad, conv_in.weight.grad):
        assert tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()
    assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32
    assert torch.isfinite(layer.running_var).all()

    layer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evaluated = layer(conv_in(x.detach()))
    assert evaluated.dtype == torch.bfloat16
    assert torch.isfinite(evaluated).all()


# --------------------------------------------------------------------------------------------
# Registry, state dict, errors
# --------------------------------------------------------------------------------------------


def test_registry_and_state_dict_keys():
    assert norm_act_layer("iabn_sync") is InPlaceABNSync
    assert norm_act_layer("iabn") is InPlaceABN
    assert norm_act_layer("abn") is ABN
    keys = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    for cls in NORM_LAYERS.values():
        layer = cls(4, activation="leaky_relu", activation_param=0.01)
        assert set(layer.state_dict()) == keys
        assert (layer.activation, layer.activation_param) == ("leaky_relu", 0.01)
    with pytest.raises(ValueError, match="valid: iabn_sync, iabn, abn"):
        norm_act_layer("std")


def test_invalid_configurations_raise():
    with pytest.raises(ValueError, match="slope must be > 0"):
        InPlaceABN(4, activation_param=0.0)
    with pytest.raises(ValueError, match="valid: leaky_relu, identity"):
        InPlaceABNSync(4, activation="elu")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        InPlaceABN(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"expects an \(N, 4, \.\.\.\) input"):
        InPlaceABN(4)(torch.randn(2, 3, 5))


# --------------------------------------------------------------------------------------------
# Two processes (gloo)
# --------------------------------------------------------------------------------------------


def load_worker():
    path = os.path.join(REPO_ROOT, "tests", "dist_norm_worker.py")
    spec = importlib.util.spec_from_file_location("dist_norm_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("device, kernels", [("cpu", "reference"), ("cpu", "fused"),
                                             pytest.param("cuda", "auto", marks=pytest.mark.cuda)])
def test_sync_over_two_processes_matches_full_batch(tmp_path, device, kernels):
    # "fused": the compiled kernels of the synchronised path (statistics and backward sums pooled
    # over the processes between them), in float32 on the CPU; on CUDA both processes share the
    # GPU(s) through gloo, and "auto" compiles the kernels there. One step from equal weights, so
    # float32 rounding stays at its own size.
    worker = load_worker()
    splits = [3, 2]  # uneven: the ranks contribute different counts
    batches = [torch.randn(5, 3, 6, 6) * 2 + 1, torch.randn(5, 3, 6, 6) - 1]
    grad_outputs = [torch.randn(5, 2, 6, 6) for _ in batches]
    net = worker.build_net(InPlaceABN)
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.2, -0.6, 0.4, -2.0]))
        net[1].bias.uniform_(-0.5, 0.5)
    features = torch.randn(5, 3) * 3 + 2
    feature_grad_output = torch.randn(5, 3)
    feature_weight = torch.tensor([-0.5, 1.0, 2.0])
    torch.save(
        {
            "state": net.state_dict(), "batches": batches, "grad_outputs": grad_outputs, "splits": splits,
            "features": features, "feature_grad_output": feature_grad_output, "feature_weight": feature_weight,
        },
        tmp_path / "setup.pt",
    )

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(REPO_ROOT, "tests", "dist_norm_worker.py"), str(tmp_path), device, kernels]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    compiled = ["backward_sums", "batch_moments", "input_grad", "normalize_activate_"] if kernels != "reference" else []
    assert [r["compiled"] for r in ranks] == [compiled, compiled]

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    for step, (batch, grad_output) in enumerate(zip(batches, grad_outputs)):
        net.zero_grad()
        x = batch.clone().requires_grad_(True)
        out = net(x)
        out.backward(grad_output)
        close(torch.cat([r["outputs"][step] for r in ranks]), out.detach())
        close(torch.cat([r["input_grads"][step] for r in ranks]), x.grad)
        for name, parameter in net.named_parameters():
            # Parameter gradients stay per rank; their sum is the full-batch gradient.
            close(ranks[0]["param_grads"][step][name] + ranks[1]["param_grads"][step][name], parameter.grad)
    for name, buffer in net.named_buffers():
        for r in ranks:
            close(r["buffers"][name], buffer)

    explicit = InPlaceABN(3, activation="identity")
    with torch.no_grad():
        explicit.weight.copy_(feature_weight)
    x = features.clone().requires_grad_(True)
    (explicit(x * 1.0) * feature_grad_output).sum().backward()
    results = [r["explicit_group"] for r in ranks]
    close(torch.cat([results[0]["input_grad"], results[1]["input_grad"]]), x.grad)
    close(results[0]["weight_grad"] + results[1]["weight_grad"], explicit.weight.grad)
    close(results[0]["running_var"], explicit.running_var)
