import pytest
import torch
import torch.nn as nn
import torchvision

from segmentation.models import ResNet, build_model, fetch_torchvision_weights, load_imagenet_weights
from segmentation.models.pretrained import torchvision_weights_path
from segmentation.models.norm import NORM_LAYERS, InPlaceABN, norm_act_layer

NORM_NAMES = sorted(NORM_LAYERS)


def _randomise_norms(model: nn.Module) -> None:
    """Random norm parameters and statistics, with about half of the weights negative.

    |weight| stays above In-Place ABN's eps: a smaller scale cannot be represented there."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                sign = torch.randint(0, 2, module.weight.shape) * 2 - 1
                module.weight.copy_(torch.empty_like(module.weight).uniform_(0.1, 1.5) * sign)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)


def _inplace_abn_checkpoint(body: nn.Module, prefix: str = "module.") -> dict:
    """A checkpoint laid out like the In-Place ABN ImageNet models: DDP prefix, ImageNet
    classifier, no num_batches_tracked buffers."""
    state = {prefix + k: v.clone() for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    state[prefix + "classifier.fc.weight"] = torch.randn(1000, body.out_channels)
    state[prefix + "classifier.fc.bias"] = torch.randn(1000)
    return {"epoch": 90, "state_dict": state}


def _torchvision_resnet(name: str, output_stride: int) -> nn.Module:
    """A random torchvision ResNet with leaky ReLUs and the dilated layout of our body (every
    block of a dilated layer uses its dilation, stride removed)."""
    model = getattr(torchvision.models, name)()
    _randomise_norms(model)
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.LeakyReLU(0.01))
    dilations = {16: {"layer4": 2}, 8: {"layer3": 2, "layer4": 4}}[output_stride]
    for layer_name, dilation in dilations.items():
        for module in getattr(model, layer_name).modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    module.dilation = module.padding = (dilation, dilation)
    return model.eval()


def _torchvision_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


# ---------------------------------------------------------------- In-Place ABN checkpoints


@pytest.mark.parametrize("prefix", ["module.", ""])
@pytest.mark.parametrize("norm_act", NORM_NAMES)
def test_inplace_abn_checkpoint_reproduces_inplace_abn_forward(tmp_path, norm_act, prefix):
    torch.manual_seed(1)
    source = ResNet("resnet18", InPlaceABN, 16)
    _randomise_norms(source)
    path = tmp_path / "resnet18_iabn_sync.pth.tar"
    torch.save(_inplace_abn_checkpoint(source, prefix), path)

    body = ResNet("resnet18", norm_act_layer(norm_act), 16)
    load_imagenet_weights(body, path)

    loaded, expected = body.state_dict(), source.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        if key.endswith(".weight") and (".bn" in key or "_bn" in key) and not isinstance(body.mod1.bn1, InPlaceABN):
            value = value.abs() + 1e-5  # plain BN reproduces the |gamma| + eps scale
        elif key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[key], value), key
    source.eval()
    body.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(body(x), source(x), rtol=1e-4, atol=1e-4)


def test_build_model_loads_pretrained_file(tmp_path):
    source = ResNet("resnet18", InPlaceABN, 8)
    _randomise_norms(source)
    path = tmp_path / "weights.pth.tar"
    torch.save(_inplace_abn_checkpoint(source), path)
    model = build_model([3, 2], backbone="resnet18", output_stride=8, norm_act="iabn", pretrained=str(path))
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(model.body.state_dict()[key], value), key


# ---------------------------------------------------------------- torchvision state dicts


@pytest.mark.parametrize(
    "name,output_stride", [("resnet18", 16), ("resnet18", 8), ("resnet50", 16)]
)
@pytest.mark.parametrize("norm_act", NORM_NAMES)
def test_torchvision_weights_reproduce_torchvision_forward(tmp_path, name, output_stride, norm_act):
    torch.manual_seed(2)
    # float64 throughout, so that only the weight mapping, not rounding, can make the outputs differ
    reference = _torchvision_resnet(name, output_stride).double()
    assert any(m.weight.min() < 0 for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)

    body = ResNet(name, norm_act_layer(norm_act), output_stride).double().eval()
    load_imagenet_weights(body, path)  # strict: every key maps, nothing missing or unexpected

    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = _torchvision_features(reference, x)
        out = body(x)
    assert out.shape == expected.shape == (2, body.out_channels, 64 // output_stride, 64 // output_stride)
    assert torch.allclose(out, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_torchvision_weights_are_copied_unchanged_for_plain_abn():
    reference = torchvision.models.resnet18()
    _randomise_norms(reference)
    body = ResNet("resnet18", norm_act_layer("abn"), 16)
    load_imagenet_weights(body, reference.state_dict())
    state = body.state_dict()
    assert torch.equal(state["mod1.conv1.weight"], reference.conv1.weight)
    assert torch.equal(state["mod1.bn1.weight"], reference.bn1.weight)
    assert torch.equal(state["mod3.block1.proj_conv.weight"], reference.layer2[0].downsample[0].weight)
    assert torch.equal(state["mod3.block1.proj_bn.running_mean"], reference.layer2[0].downsample[1].running_mean)
    assert torch.equal(state["mod5.block2.convs.bn2.bias"], reference.layer4[1].bn2.bias)


def test_torchvision_weights_flip_negative_gamma_for_inplace_abn():
    reference = torchvision.models.resnet18()
    _randomise_norms(reference)
    body = ResNet("resnet18", norm_act_layer("iabn"), 16)
    load_imagenet_weights(body, reference.state_dict())
    bn, conv = reference.layer1[0].bn2, reference.layer1[0].conv2
    ours_bn, ours_conv = body.mod2.block1.convs.bn2, body.mod2.block1.convs.conv2
    sign = torch.where(bn.weight < 0, -1.0, 1.0)
    assert torch.allclose(ours_bn.weight.abs() + ours_bn.eps, bn.weight.abs())
    assert torch.equal(ours_bn.running_mean, bn.running_mean * sign)
    assert torch.equal(ours_bn.bias, bn.bias)
    assert torch.equal(ours_conv.weight, conv.weight * sign.view(-1, 1, 1, 1))


# ---------------------------------------------------------------- wrong files


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    body = ResNet("resnet18", norm_act_layer("abn"), 16)
    with pytest.raises(ValueError) as error:
        load_imagenet_weights(body, path)
    message = str(error.value)
    assert str(path) in message
    assert "unexpected keys: mod2.block1.convs.conv3.weight" in message
    assert "missing keys" not in message  # resnet18's keys are a subset of resnet50's names...
    assert "shape mismatches" in message and "mod2.block1.convs.conv1.weight" in message  # ...with other shapes


def test_incomplete_checkpoint_names_the_keys_and_counts(tmp_path):
    body = ResNet("resnet18", norm_act_layer("abn"), 16)
    checkpoint = _inplace_abn_checkpoint(body)
    removed = [k for k in checkpoint["state_dict"] if k.startswith("module.mod3.")][:7]
    for key in removed:
        del checkpoint["state_dict"][key]
    checkpoint["state_dict"]["module.mod6.block1.convs.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth.tar"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError) as error:
        load_imagenet_weights(body, path)
    message = str(error.value)
    assert str(path) in message
    assert f"7 missing keys: {removed[0][len('module.'):]}" in message and "(2 more)" in message
    assert "1 unexpected keys: mod6.block1.convs.conv1.weight" in message


def test_unrecognised_format_and_missing_file(tmp_path):
    body = ResNet("resnet18", norm_act_layer("abn"), 16)
    path = tmp_path / "other.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="other.pth.*unrecognised"):
        load_imagenet_weights(body, path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_imagenet_weights(body, tmp_path / "nowhere.pth")


# ---------------------------------------------------------------- --pretrained torchvision: torch hub's cache
# (conftest.py's torch_hub fixture: an empty cache and no network)


def _resnet18_cache_name() -> str:
    return torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]  # resnet18-<hash>.pth


def test_torchvision_weights_path_is_where_torchvision_caches_them(torch_hub):
    assert torchvision_weights_path("resnet18") == str(torch_hub / _resnet18_cache_name())
    assert torchvision_weights_path("resnet101").endswith(
        torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])


def test_build_model_reads_torchvision_weights_from_the_cache(torch_hub):
    reference = torchvision.models.resnet18(weights=None)
    _randomise_norms(reference)
    torch_hub.mkdir(parents=True)
    torch.save(reference.state_dict(), torch_hub / _resnet18_cache_name())
    assert fetch_torchvision_weights("resnet18") == str(torch_hub / _resnet18_cache_name())  # cached: no download
    model = build_model([3], backbone="resnet18", norm_act="abn", pretrained="torchvision")
    assert torch.equal(model.body.mod4.block2.convs.conv1.weight, reference.layer3[1].conv1.weight)
    assert torch.equal(model.body.mod1.bn1.running_var, reference.bn1.running_var)


def test_build_model_never_downloads_torchvision_weights(torch_hub):
    with pytest.raises(FileNotFoundError) as error:
        build_model([3], backbone="resnet18", norm_act="abn", pretrained="torchvision")
    message = str(error.value)
    assert str(torch_hub / _resnet18_cache_name()) in message
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in message


def test_fetch_downloads_into_the_cache_once(torch_hub, monkeypatch):
    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, dst))
        torch.save({"conv1.weight": torch.zeros(1)}, dst)

    monkeypatch.setattr("torch.hub.download_url_to_file", fake_download)
    path = str(torch_hub / _resnet18_cache_name())
    assert fetch_torchvision_weights("resnet18") == path
    assert fetch_torchvision_weights("resnet18") == path
    assert downloads == [(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, path)]
