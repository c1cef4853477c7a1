"""The fused path of In-Place ABN (the norm_kernels functions compiled) against the reference (the same
functions run as written).

The fused path runs in two ways here: eagerly (fast, every case) and through ``torch.compile`` with the
inductor CPU backend (what runs on CUDA, one small case because compiling takes a while on CPU).
"""
import pytest
import torch

from conftest import use_eager_fused_kernels
from segmentation.models import norm_kernels
from segmentation.models.norm import InPlaceABN, InPlaceABNFunction

EPS = 1e-5


@pytest.fixture
def kernel_mode():
    """Restore the automatic selection after the test."""
    yield norm_kernels.set_kernel_mode
    norm_kernels.set_kernel_mode("auto")


@pytest.fixture
def eager_fused(monkeypatch, kernel_mode):
    """The fused formulation without compiling it."""
    use_eager_fused_kernels(monkeypatch)


def run_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str, grad_out: torch.Tensor):
    """Output, running statistics and the gradients of x, weight and bias of one training call."""
    layer = InPlaceABN(x.shape[1], activation=activation, activation_param=0.1).to(weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x * 1)  # a non-leaf the layer may overwrite
    out.backward(grad_out)
    return out.detach(), layer.running_mean, layer.running_var, x.grad, layer.weight.grad, layer.bias.grad


def test_selection(kernel_mode):
    cpu = torch.zeros(2, 3)
    assert not norm_kernels.use_fused(cpu)  # auto: CUDA only
    kernel_mode("fused")
    assert norm_kernels.use_fused(cpu)
    kernel_mode("reference")
    assert not norm_kernels.use_fused(cpu)
    with pytest.raises(ValueError, match="kernel mode"):
        kernel_mode("fast")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_matches_reference(kernel_mode, monkeypatch, dtype, channels_last):
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64) * 3 + 1
    grad_out = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        grad_out = grad_out.to(memory_format=torch.channels_last)
    weight = torch.linspace(-1.5, 2.0, 5, dtype=torch.float64)
    bias = torch.linspace(0.3, -0.4, 5, dtype=torch.float64)
    args = (x.to(dtype), weight, bias, "leaky_relu", grad_out.to(dtype))

    kernel_mode("reference")
    reference = run_layer(*args)
    use_eager_fused_kernels(monkeypatch)
    fused = run_layer(*args)

    # Compiled, the fused path may order and fuse the arithmetic differently (eagerly, as here, it is the same).
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for expected, actual in zip(reference, fused):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance)
    if channels_last:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)
        assert fused[3].is_contiguous(memory_format=torch.channels_last)


def _layer_call(with_residual: bool, device: str = "cpu") -> list:
    """Output, batch statistics and gradients of one float64 In-Place ABN call (channels-last)."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=generator) * 2 + 0.5)
    residual = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=generator) if with_residual else None
    grad_out = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=generator).to(device)
    weight = torch.tensor([0.8, -1.3, 0.1, 2.0], dtype=torch.float64)
    bias = torch.tensor([0.2, -0.1, 0.0, 0.5], dtype=torch.float64)
    inputs = [t.to(device).requires_grad_(True) for t in (x.to(memory_format=torch.channels_last), weight, bias)]
    res = residual.to(device).requires_grad_(True) if with_residual else None
    y, mean, var = InPlaceABNFunction.apply(inputs[0] * 1, inputs[1], inputs[2], EPS, "leaky_relu", 0.1, None, res)
    y.backward(grad_out)
    return [y.detach(), mean, var] + [t.grad for t in inputs] + ([res.grad] if with_residual else [])


@pytest.mark.slow
@pytest.mark.parametrize("with_residual", [False, True])
def test_compiled_kernels_match_reference_on_cpu(kernel_mode, with_residual):
    """The kernels torch.compile generates (inductor, CPU) equal the reference in float64."""
    kernel_mode("reference")
    reference = _layer_call(with_residual)
    kernel_mode("fused")
    compiled = _layer_call(with_residual)
    for expected, actual in zip(reference, compiled):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_kernels_are_one_graph_for_every_channel_count(kernel_mode, monkeypatch):
    """Layers of 8, 16 and 24 channels share the graphs of one layer: the compiler must not
    specialise on the parameters' shapes (a ResNet-101 would otherwise compile one graph per channel
    count and variant, past dynamo's recompile limit, after which it runs the functions uncompiled)."""
    from torch._dynamo.utils import counters

    kernel_mode("fused")

    def graphs(channel_counts):
        torch._dynamo.reset()
        counters.clear()
        monkeypatch.setattr(norm_kernels, "_compiled", {})
        for channels in channel_counts:
            layer = InPlaceABN(channels)
            x = torch.randn(2, channels, 6, 6, requires_grad=True)
            layer(x * 1).sum().backward()
        return counters["stats"]["unique_graphs"]

    assert graphs([8, 16, 24]) == graphs([8]) == 2  # forward_local, backward_local


@pytest.mark.cuda
@pytest.mark.parametrize("with_residual", [False, True])
def test_cuda_kernels_match_the_cpu_reference(kernel_mode, with_residual):
    """On a CUDA device the automatic selection compiles the fused kernels; in float64 they equal
    the reference operations on the CPU."""
    kernel_mode("auto")
    reference = _layer_call(with_residual)
    on_cuda = _layer_call(with_residual, device="cuda")
    for expected, actual in zip(reference, on_cuda):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-10, atol=1e-10)


@pytest.fixture
def single_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_kernels_with_a_process_group(eager_fused, single_process_group, with_residual):
    """The split fused functions (statistics pooled over a group between them) equal the one-graph ones."""
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2 + 0.5
    residual = torch.randn(3, 4, 5, 5, dtype=torch.float64) if with_residual else None
    grad_out = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    weight = torch.tensor([0.8, -1.3, 0.1, 2.0], dtype=torch.float64)
    bias = torch.tensor([0.2, -0.1, 0.0, 0.5], dtype=torch.float64)

    def run(group):
        inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        res = residual.clone().requires_grad_(True) if with_residual else None
        y, mean, var = InPlaceABNFunction.apply(inputs[0] * 1, inputs[1], inputs[2], EPS, "leaky_relu", 0.1, group, res)
        y.backward(grad_out)
        return [y.detach(), mean, var] + [t.grad for t in inputs] + ([res.grad] if with_residual else [])

    local = run(None)
    pooled = run(single_process_group)
    for expected, actual in zip(local, pooled):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


class InPlaceChain(torch.nn.Module):
    """Every way the model uses In-Place ABN's in-place autograd function (``ctx.mark_dirty``): on a
    convolution's output, with a residual (the block input, used again afterwards), without the
    activation (then a leaky ReLU out of place), two layers in a row, and on 2-D features."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = InPlaceABN(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = InPlaceABN(channels)
        self.norm3 = InPlaceABN(channels, activation="identity")
        self.norm4 = InPlaceABN(channels, activation_param=0.2)
        self.norm5 = InPlaceABN(channels)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2, self.norm3, self.norm4, self.norm5):
                norm.weight.uniform_(-1.5, 1.5)  # negative weights too: the effective scale is |w| + eps
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = self.norm1(self.conv1(x))
        y = self.norm2(self.conv2(y), residual=x)  # x stays needed: its gradient flows back twice
        tapped = self.norm3(y * 1.0, activate=False)  # pre-activation, activated out of place
        y = torch.nn.functional.leaky_relu(tapped, 0.01) + 0.1 * tapped
        y = self.norm4(y * 1.0)
        pooled = self.norm5(y.mean(dim=(2, 3)) * 2.0)  # (N, C): 2-D input
        return y * pooled[:, :, None, None]


def _chain_results(module, x, grad_output):
    """Output, input gradient, every parameter gradient and running statistic of one training call."""
    x = x.clone().requires_grad_(True)
    output = module(x)
    output.backward(grad_output)
    results = {"output": output.detach(), "input grad": x.grad}
    module = getattr(module, "_orig_mod", module)  # the compiled wrapper's module
    for name, parameter in module.named_parameters():
        results[f"{name} grad"] = parameter.grad.clone()
        parameter.grad = None
    results.update({name: buffer.clone() for name, buffer in module.named_buffers() if "running" in name})
    return results


def _compiled_against_eager(device: str, channels_last: bool):
    """The chain's results eagerly and under torch.compile, from equal weights, in float64."""
    torch.manual_seed(0)
    chain = InPlaceChain().double().to(device)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64, device=device)
    grad_output = torch.randn(3, 4, 6, 6, dtype=torch.float64, device=device)  # not uniform: every term counts
    if channels_last:
        chain, x = chain.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    state = {name: value.clone() for name, value in chain.state_dict().items()}
    eager = _chain_results(chain, x, grad_output)
    chain.load_state_dict(state)
    torch._dynamo.reset()
    compiled = _chain_results(torch.compile(chain, fullgraph=True), x, grad_output)
    return eager, compiled


def _assert_equal_results(actual, expected):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_model_equals_eager_on_the_in_place_path(channels_last):
    """torch.compile traces In-Place ABN's in-place autograd function into the model's graph (no graph
    break); forward, gradients and running statistics equal eager execution in float64."""
    explanation = torch._dynamo.explain(InPlaceChain().double())(torch.randn(3, 4, 6, 6, dtype=torch.float64))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    eager, compiled = _compiled_against_eager("cpu", channels_last)
    _assert_equal_results(compiled, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_model_equals_eager_on_the_in_place_path_on_cuda(channels_last):
    """The same on a GPU, with that machine's own torch."""
    eager, compiled = _compiled_against_eager("cuda", channels_last)
    _assert_equal_results(compiled, eager)


def test_the_comparison_sees_a_silently_wrong_gradient(monkeypatch):
    """A backward that drops one term of In-Place ABN's input gradient (the x_hat * mean(dL/dz * x_hat)
    projection; a wrong gradient of the size a mishandled in-place input causes) fails the comparison
    above: the chain's inputs and upstream gradient do not hide it."""
    torch.manual_seed(0)
    chain = InPlaceChain().double()
    x, grad_output = torch.randn(3, 4, 6, 6, dtype=torch.float64), torch.randn(3, 4, 6, 6, dtype=torch.float64)
    state = {name: value.clone() for name, value in chain.state_dict().items()}
    right = _chain_results(chain, x, grad_output)
    chain.load_state_dict(state)
    input_grad_from = norm_kernels.input_grad_from

    def without_projection(x_hat, grad_z, mean_grad_z, mean_grad_z_x_hat, *rest):
        return input_grad_from(x_hat, grad_z, mean_grad_z, torch.zeros_like(mean_grad_z_x_hat), *rest)

    monkeypatch.setattr(norm_kernels, "input_grad_from", without_projection)
    wrong = _chain_results(chain, x, grad_output)
    torch.testing.assert_close(wrong["output"], right["output"], rtol=0, atol=0)  # the forward is right
    with pytest.raises(AssertionError, match="input grad"):
        _assert_equal_results(wrong, right)
