"""POD distillation against slow per-element transcriptions of the spec's formulas (float64
Python loops over regions, rows and columns), and the parsing of its options."""
import json
import math

import pytest
import torch

from segmentation.pod import pod_embedding, pod_loss, prepare, reconcile_channels
from segmentation.pod_settings import LayerSettings, PodSettings, pod_settings

B = 2
SCALES = (1, 2, 4)
PLOP_OPTIONS = '{"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}'


def rand(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


def layer(**overrides):
    values = dict(type="local", factor=0.3, prepro="pow", norm=False, use_adaptative_factor=False,
                  extra_channels="sum", spp_scales=SCALES, schedule=True)
    values.update(overrides)
    return LayerSettings(**values)


# ------------------------------------------------------------ slow transcriptions (one image: x[c][row][col])

def slow_prepare(x, prepro):
    f = {"pow": lambda v: v * v, "none": lambda v: v, "relu": lambda v: max(v, 0.0), "abs": abs}[prepro]
    return [[[f(v) for v in row] for row in channel] for channel in x]


def slow_local(x, scales):
    channels, height, width = len(x), len(x[0]), len(x[0][0])
    out = []
    for s in scales:
        kh, kw = height // s, width // s
        for i in range(s):
            for j in range(s):
                rows, cols = range(i * kh, (i + 1) * kh), range(j * kw, (j + 1) * kw)
                for c in range(channels):
                    for r in rows:
                        out.append(sum(x[c][r][col] for col in cols) / kw)
                for c in range(channels):
                    for col in cols:
                        out.append(sum(x[c][r][col] for r in rows) / kh)
    return out


def slow_spatial(x):
    channels, height, width = len(x), len(x[0]), len(x[0][0])
    over_width = [sum(x[c][r][col] for col in range(width)) for c in range(channels) for r in range(height)]
    over_height = [sum(x[c][r][col] for r in range(height)) for c in range(channels) for col in range(width)]
    return over_width + over_height


def slow_global(x, scales):
    channels, height, width = len(x), len(x[0]), len(x[0][0])
    out = []
    for s in scales:
        kh, kw = height // s, width // s
        grid = [[[sum(x[c][r][col] for r in range(i * kh, (i + 1) * kh) for col in range(j * kw, (j + 1) * kw))
                  / (kh * kw) for j in range(s)] for i in range(s)] for c in range(channels)]
        out += [sum(grid[c][i][j] for i in range(s)) for c in range(channels) for j in range(s)]
        out += [sum(grid[c][i][j] for j in range(s)) for c in range(channels) for i in range(s)]
    return out


def slow_embedding(x, type, scales):
    if type == "local":
        return slow_local(x, scales)
    if type == "global":
        return slow_global(x, scales)
    return slow_spatial(x)


def slow_reconcile(old, new, extra_channels):
    num_old = len(old)
    if extra_channels == "trim":
        return new[:num_old]
    height, width = len(new[0]), len(new[0][0])
    background = [[new[0][r][col] + sum(new[c][r][col] for c in range(num_old, len(new)))
                   for col in range(width)] for r in range(height)]
    return [background] + new[1:num_old]


def slow_distance(old, new, settings):
    """(1/B) sum_b ||Psi(a)_b - Psi(b)_b||_2 for one map, old and new as nested lists per image."""
    total = 0.0
    for a, b in zip(old, new):
        if len(b) != len(a):
            b = slow_reconcile(a, b, settings.extra_channels)
        ea = slow_embedding(slow_prepare(a, settings.prepro), settings.type, settings.spp_scales)
        eb = slow_embedding(slow_prepare(b, settings.prepro), settings.type, settings.spp_scales)
        if settings.norm:
            na, nb = math.sqrt(sum(v * v for v in ea)), math.sqrt(sum(v * v for v in eb))
            ea, eb = [v / na for v in ea], [v / nb for v in eb]
        total += math.sqrt(sum((u - v) ** 2 for u, v in zip(ea, eb)))
    return total / len(old)


def slow_pod_loss(old_maps, new_maps, settings, num_channels, num_new, labels=None):
    total = 0.0
    for index, (old, new) in enumerate(zip(old_maps, new_maps)):
        layer_settings = settings.last if index == len(new_maps) - 1 else settings.features
        term = layer_settings.factor * slow_distance(old.tolist(), new.tolist(), layer_settings)
        if layer_settings.schedule:
            term *= math.sqrt(num_channels / num_new)
        if layer_settings.use_adaptative_factor:
            flat = labels.flatten().tolist()
            term *= sum(1 for y in flat if y == 0) / len(flat)
        total += term
    return total / len(new_maps)


# ------------------------------------------------------------ embeddings

@pytest.mark.parametrize("prepro", ("pow", "none", "relu", "abs"))
def test_prepare_matches_formula(prepro):
    x = rand(B, 2, 3, 4)
    expected = torch.tensor([slow_prepare(image, prepro) for image in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(prepare(x, prepro), expected)


@pytest.mark.parametrize("type", ("local", "global", "spatial"))
@pytest.mark.parametrize("height, width", ((8, 8), (8, 12), (12, 8)))
def test_embedding_matches_formula(type, height, width):
    x = rand(B, 3, height, width)
    expected = torch.tensor([slow_embedding(image, type, SCALES) for image in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(pod_embedding(x, type, SCALES), expected)


@pytest.mark.parametrize("channels, width", ((3, 8), (5, 16), (2, 32)))
def test_local_embedding_size_is_14_c_w_on_square_maps(channels, width):
    assert pod_embedding(rand(1, channels, width, width), "local", SCALES).shape == (1, 14 * channels * width)


def test_local_embedding_uses_every_row_of_a_tall_map():
    # The original's k = W // s for both axes left the bottom 4 rows of a 12x8 map in no region.
    x = rand(1, 2, 12, 8)
    changed = x.clone()
    changed[:, :, 11] += 1.0
    assert not torch.allclose(pod_embedding(x, "local", SCALES), pod_embedding(changed, "local", SCALES))
    assert torch.isfinite(pod_embedding(rand(1, 2, 8, 12), "local", SCALES)).all()


def test_embedding_refuses_grids_finer_than_the_map():
    with pytest.raises(ValueError, match=r"1\.\.4 for a 4x6 map"):
        pod_embedding(rand(1, 2, 4, 6), "local", (1, 8))


# ------------------------------------------------------------ channel reconciliation

@pytest.mark.parametrize("extra_channels", ("sum", "trim"))
def test_reconcile_channels_matches_formula(extra_channels):
    old, new = rand(B, 3, 4, 5), rand(B, 6, 4, 5)
    expected = [slow_reconcile(a, b, extra_channels) for a, b in zip(old.tolist(), new.tolist())]
    torch.testing.assert_close(reconcile_channels(old, new, extra_channels),
                               torch.tensor(expected, dtype=torch.float64))


def test_reconcile_channels_keeps_matching_maps():
    old, new = rand(B, 3, 4, 4), rand(B, 3, 4, 4)
    assert reconcile_channels(old, new, "sum") is new


# ------------------------------------------------------------ the loss

def three_maps(requires_grad=False):
    """Two feature maps and logits with 2 new channels (C_old = 3, C_t = 5), non-square included."""
    old = [rand(B, 4, 8, 8), rand(B, 3, 8, 12), rand(B, 3, 4, 4)]
    new = [rand(B, 4, 8, 8, requires_grad=requires_grad), rand(B, 3, 8, 12, requires_grad=requires_grad),
           rand(B, 5, 4, 4, requires_grad=requires_grad)]
    return old, new


LOSS_CASES = {
    "plop": (layer(), layer(factor=0.05)),
    "global, trim, no schedule": (layer(type="global", schedule=False), layer(type="global", extra_channels="trim")),
    "spatial, relu, norm": (layer(type="spatial", prepro="relu", norm=True), layer(type="spatial", norm=True)),
    "abs, none, adaptive": (layer(prepro="abs", use_adaptative_factor=True),
                            layer(prepro="none", use_adaptative_factor=True, spp_scales=(1, 4))),
    "features only scheduled": (layer(factor=0.7), layer(factor=2.0, schedule=False)),
}


@pytest.mark.parametrize("features, last", LOSS_CASES.values(), ids=list(LOSS_CASES))
def test_pod_loss_matches_formula(features, last):
    old, new = three_maps()
    labels = torch.randint(0, 3, (B, 16, 16))
    settings = PodSettings(features=features, last=last)
    loss = pod_loss(old, new, settings, num_channels=5, num_new_channels=2, labels=labels)
    expected = slow_pod_loss(old, new, settings, 5, 2, labels)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_pod_loss_with_the_plop_preset():
    old, new = three_maps()
    settings = pod_settings("local", 0.01, PLOP_OPTIONS, "pow", [1, 2, 4], False)
    loss = pod_loss(old, new, settings, num_channels=5, num_new_channels=2)
    torch.testing.assert_close(loss, torch.tensor(slow_pod_loss(old, new, settings, 5, 2), dtype=torch.float64))


def test_zero_factor_maps_still_count_in_the_number_of_maps():
    old, new = three_maps()
    alone = pod_loss(old[2:], new[2:], PodSettings(features=layer(), last=layer()), 5, 2)
    with_skipped = pod_loss(old, new, PodSettings(features=layer(factor=0.0), last=layer()), 5, 2)
    torch.testing.assert_close(with_skipped, alone / 3)


def test_all_zero_factors_give_zero():
    old, new = three_maps()
    loss = pod_loss(old, new, PodSettings(features=layer(factor=0.0), last=layer(factor=0.0)), 5, 2)
    assert loss.item() == 0.0 and loss.dtype == torch.float64


def test_gradient_flows_to_the_new_maps_only():
    old, new = three_maps(requires_grad=True)
    for x in old:
        x.requires_grad_(True)
    pod_loss(old, new, PodSettings(features=layer(), last=layer()), 5, 2).backward()
    assert all(x.grad is None for x in old)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in new)


def test_float64_stays_float64_and_float16_computes_in_float32():
    old, new = three_maps()
    settings = PodSettings(features=layer(), last=layer())
    assert pod_loss(old, new, settings, 5, 2).dtype == torch.float64
    # 300^2 overflows float16.
    half_old = [(300 * x).half() for x in old]
    half_new = [(300 * x).half() for x in new]
    loss = pod_loss(half_old, half_new, settings, 5, 2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def one_line_error(call, *words):
    with pytest.raises(ValueError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_pod_loss_refusals():
    old, new = three_maps()
    settings = PodSettings(features=layer(), last=layer())
    one_line_error(lambda: pod_loss(old, new[:2], settings, 5, 2), "as many old maps")
    one_line_error(lambda: pod_loss([old[0]], [rand(B, 4, 8, 4)], settings, 5, 2), "POD map 0")
    one_line_error(lambda: pod_loss([old[2], old[2]], [new[2], new[2]], settings, 5, 2), "POD map 0")
    one_line_error(lambda: pod_loss([new[2]], [old[2]], settings, 5, 2), "POD map 0")
    one_line_error(lambda: pod_loss(old, new, settings, 5, 0), "--no_pod_schedule")
    adaptive = PodSettings(features=layer(use_adaptative_factor=True), last=layer())
    one_line_error(lambda: pod_loss(old, new, adaptive, 5, 2), "labels")


def test_no_schedule_accepts_no_new_channels():
    old = [rand(B, 3, 4, 4)]
    new = [rand(B, 3, 4, 4)]
    settings = PodSettings(features=layer(schedule=False), last=layer(schedule=False))
    torch.testing.assert_close(pod_loss(old, new, settings, 3, 0),
                               torch.tensor(slow_pod_loss(old, new, settings, 3, 0), dtype=torch.float64))


# ------------------------------------------------------------ settings

def test_settings_without_options():
    settings = pod_settings("global", 0.5, None, "relu", [1, 2], True)
    expected = LayerSettings(type="global", factor=0.5, prepro="relu", norm=False, use_adaptative_factor=False,
                             extra_channels="sum", spp_scales=(1, 2), schedule=False)
    assert settings == PodSettings(features=expected, last=expected)


@pytest.mark.parametrize("options", (PLOP_OPTIONS, json.loads(PLOP_OPTIONS)))
def test_settings_of_the_plop_preset(options):
    settings = pod_settings("local", 0.01, options, "pow", [1, 2, 4], False)
    assert settings.features == layer(factor=0.01)
    assert settings.last == layer(factor=0.0005)


def test_settings_before_and_after():
    options = {"switch": {
        "before": {"type": "spatial", "factor": 2, "norm": True, "prepro": "abs", "use_adaptative_factor": True},
        "after": {"extra_channels": "trim", "spp_scales": [2], "use_pod_schedule": False, "prepro": "none"},
    }}
    settings = pod_settings("local", 0.01, options, "pow", [1, 2, 4], False)
    assert settings.features == layer(type="spatial", factor=2.0, norm=True, prepro="abs", use_adaptative_factor=True)
    # "before" does not leak into the last map (it did in the original).
    assert settings.last == layer(factor=0.01, prepro="none", extra_channels="trim", spp_scales=(2,), schedule=False)


@pytest.mark.parametrize("options, words", [
    ({"pool": False}, ("--pod_options pool:", "not implemented")),
    ({"difference_function": "l1"}, ("--pod_options difference_function:", "not implemented")),
    ({"difference_function_all": "kl"}, ("--pod_options difference_function_all:", "not implemented")),
    ({"switch": {"mask_position": "all"}}, ("--pod_options switch.mask_position:", "not implemented")),
    ({"switch": {"normalize_per_scale": True}}, ("--pod_options switch.normalize_per_scale:", "not implemented")),
    ({"switch": {"after": {"apply_mask": "old"}}}, ("--pod_options switch.after.apply_mask:", "not implemented")),
    ({"switch": {"after": {"upscale_mask_topk": 2}}},
     ("--pod_options switch.after.upscale_mask_topk:", "not implemented")),
    ({"switch": {"after": {"mix_new_old": 0.5}}}, ("--pod_options switch.after.mix_new_old:", "not implemented")),
    ({"switch": {"before": {"extra_channels": "sum"}}},
     ("--pod_options switch.before.extra_channels:", "not implemented")),
    ({"switch": {"before": {"spp_scales": [1]}}}, ("--pod_options switch.before.spp_scales:", "not implemented")),
    ({"switch": {"before": {"use_pod_schedule": False}}},
     ("--pod_options switch.before.use_pod_schedule:", "not implemented")),
    ({"switch": {"before": {"apply_mask": "old"}}}, ("--pod_options switch.before.apply_mask:", "not implemented")),
    ({"swtich": {}}, ("--pod_options:", "unknown key 'swtich'")),
    ({"switch": {"middle": {}}}, ("--pod_options switch:", "unknown key 'middle'")),
    ({"switch": {"after": {"factr": 1}}}, ("--pod_options switch.after:", "unknown key 'factr'")),
    ({"switch": {"before": {"typ": "local"}}}, ("--pod_options switch.before:", "unknown key 'typ'")),
    ({"switch": {"after": {"bad\nkey": 1}}}, ("--pod_options switch.after:", "unknown key 'bad\\nkey'")),
    ({"switch": {"after": {"type": "x"}}},
     ("--pod_options switch.after.type: 'x' is not one of local, global, spatial",)),
    ({"switch": {"before": {"prepro": "square"}}}, ("--pod_options switch.before.prepro: 'square'",)),
    ({"switch": {"after": {"extra_channels": "mean"}}}, ("--pod_options switch.after.extra_channels: 'mean'",)),
    ({"switch": {"after": {"factor": "0.1"}}}, ("--pod_options switch.after.factor: '0.1'",)),
    ({"switch": {"after": {"factor": -1}}}, ("--pod_options switch.after.factor: -1",)),
    ({"switch": {"before": {"factor": True}}}, ("--pod_options switch.before.factor: True",)),
    ({"switch": {"before": {"norm": 1}}}, ("--pod_options switch.before.norm: 1",)),
    ({"switch": {"after": {"use_adaptative_factor": "yes"}}},
     ("--pod_options switch.after.use_adaptative_factor: 'yes'",)),
    ({"switch": {"after": {"use_pod_schedule": None}}}, ("--pod_options switch.after.use_pod_schedule: None",)),
    ({"switch": {"after": {"spp_scales": [1, 0]}}}, ("--pod_options switch.after.spp_scales: [1, 0]",)),
    ({"switch": {"after": {"spp_scales": []}}}, ("--pod_options switch.after.spp_scales: []",)),
    ({"switch": {"after": []}}, ("--pod_options switch.after: expected a JSON object",)),
    ({"switch": None}, ("--pod_options switch: expected a JSON object",)),
    ([1], ("--pod_options: expected a JSON object",)),
    ('{"switch": ', ("--pod_options: invalid JSON",)),
    ("NaN", ("--pod_options: expected a JSON object",)),
    ('{"switch": {"after": {"factor": NaN}}}', ("--pod_options switch.after.factor: nan",)),
])
def test_settings_refusals(options, words):
    one_line_error(lambda: pod_settings("local", 0.01, options, "pow", [1, 2, 4], False), *words)


@pytest.mark.parametrize("arguments, words", [
    (("spp", 0.01, "pow", [1]), ("--pod: 'spp' is not one of local, global, spatial",)),
    (("local", -0.1, "pow", [1]), ("--pod_factor: -0.1",)),
    (("local", 0.01, "sq", [1]), ("--pod_prepro: 'sq'",)),
    (("local", 0.01, "pow", [0, 1]), ("--spp_scales: [0, 1]",)),
])
def test_settings_refuse_bad_plain_options(arguments, words):
    pod, factor, prepro, scales = arguments
    one_line_error(lambda: pod_settings(pod, factor, None, prepro, scales, False), *words)
