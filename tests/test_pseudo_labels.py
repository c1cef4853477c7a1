"""PLOP's pseudo-labels: the threshold walks against hand-computed histograms, the uncertainty
against its per-pixel formula, and the relabelling of 2x2 images per mode."""
import math

import pytest
import torch

from segmentation.pseudo_labels import (
    MEDIAN_BINS,
    ORIGINAL_BINS,
    PseudoLabels,
    add_to_histograms,
    entropy_uncertainty,
    max_probability,
    max_uncertainty,
    median_thresholds,
    original_thresholds,
    pseudo_label,
)

IGNORE = 255
FLOOR = 0.001  # PLOP's --threshold


def histograms_with(rows, num_classes=3, bins=100):
    """(num_classes, bins) int64 counts; ``rows`` maps class -> {bin: count}."""
    histograms = torch.zeros(num_classes, bins, dtype=torch.int64)
    for c, counts in rows.items():
        for k, count in counts.items():
            histograms[c, k] = count
    return histograms


def assert_close(actual, expected, rtol=1e-6):
    # torch.testing.assert_close's first call imports for about a second; this file stays fast.
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=rtol, atol=0), (actual, expected)


def f32(x):
    """The original computed its thresholds in float32."""
    return torch.tensor(x, dtype=torch.float32).item()


# ---------------------------------------------------------------- the original's walk

def test_original_stops_in_bin_0_and_interpolates_inside_it():
    # total 50, half 25; k = 0: 0 <= 25 <= 0 + 30, stop. tau = 0/100 + (25 - 0) / 30 * 0.01.
    tau = original_thresholds(histograms_with({1: {0: 30, 50: 20}}), FLOOR, "entropy")
    assert tau.dtype == torch.float64 and tau.shape == (3,)
    assert tau[1].item() == pytest.approx(25 / 30 * 0.01, rel=1e-6)  # 0.008333, not the median (bin 0)


def test_original_runs_through_to_plus_infinity_when_no_bin_holds_half():
    # total 15000, half 7500. running (a sum of bin indices) stays below 7500 and no bin holds
    # 7500: no stop. Last bin: 0.99 + (7500 - (0 + 1 + ... + 99 = 4950)) / 0 * 0.01 = +inf.
    tau = original_thresholds(histograms_with({2: {0: 5000, 1: 5000, 2: 5000}}), FLOOR, "entropy")
    assert tau[2].item() == math.inf


def test_original_runs_through_to_minus_infinity_on_toy_counts():
    # 10 pixels in each of bins 0..9: total 100, half 50. Before bin k, running = k (k - 1) / 2;
    # k = 9: 36 <= 50 <= 46 fails, k = 10: 45 <= 50 <= 45 fails, then running > 50. Last bin:
    # 0.99 + (50 - 4950) / 0 * 0.01 = -inf, floored in entropy mode, kept by the probability cap.
    histograms = histograms_with({1: {k: 10 for k in range(10)}})
    assert original_thresholds(histograms, FLOOR, "entropy")[1].item() == f32(FLOOR)
    assert original_thresholds(histograms, 0.9, "probability")[1].item() == -math.inf


def test_original_reads_the_previous_bin_at_k_29():
    assert int(29 / 100 * 100) == 28 and 29 / 100 * 100 != 29  # 28.999999999999996
    # total 820, half 410. Bins 0..27 are empty and running reaches 0 + 1 + ... + 27 = 378;
    # k = 28: 378 <= 410 <= 378 + 10 fails, running = 406. k = 29 reads bin 28 (10 pixels):
    # 406 <= 410 <= 416, stop: tau = 0.29 + (410 - 406) / 10 * 0.01 = 0.2940.
    # Reading bin 29 (20 pixels) would give 0.29 + 4 / 20 * 0.01 = 0.2920.
    tau = original_thresholds(histograms_with({0: {28: 10, 29: 20, 90: 790}}), FLOOR, "entropy")
    assert tau[0].item() == pytest.approx(0.2940, abs=1e-6)


def test_original_nan_is_fixed_to_the_bin_edge():
    # total 2, half 1 (both pixels in bin 3). k = 0: 0 <= 1 <= 0 fails, running 0; k = 1:
    # 0 <= 1 <= 0 fails, running 1; k = 2: 1 <= 1 <= 1 + 0 stops on an empty bin with
    # half == running: the original's (1 - 1) / 0 = NaN. Fixed: the bin's lower edge, 0.02.
    histograms = histograms_with({1: {3: 2}})
    assert original_thresholds(histograms, FLOOR, "entropy")[1].item() == f32(0.02)
    assert original_thresholds(histograms, 0.9, "probability")[1].item() == f32(0.02)


def test_original_ties_are_decided_in_float32():
    # total 870 (bin 90), half 435. running after k = 29 is 406 + 28.999999999999996
    # = 434.99999999999994, which float32 rounds to 435: k = 30 (empty) stops with 435 <= 435 <= 435
    # (float64 arithmetic would not stop there). The original's 0/0, fixed: 0.30.
    histograms = histograms_with({0: {90: 870}})
    assert original_thresholds(histograms, FLOOR, "entropy")[0].item() == f32(0.30)


def test_original_floor_cap_and_empty_classes():
    histograms = histograms_with({1: {0: 30, 50: 20}})  # class 1: 0.008333; classes 0 and 2 empty
    entropy = original_thresholds(histograms, 0.05, "entropy")
    assert entropy.tolist() == [f32(0.05), f32(0.05), f32(0.05)]  # max(median, floor); empty: max(0, floor)
    entropy = original_thresholds(histograms, FLOOR, "entropy")
    assert entropy[0].item() == f32(FLOOR) and entropy[1].item() == pytest.approx(25 / 30 * 0.01, rel=1e-6)
    probability = original_thresholds(histograms, 0.9, "probability")
    assert probability[0].item() == 0.0 and probability[1].item() == pytest.approx(25 / 30 * 0.01, rel=1e-6)


def test_original_probability_mode_with_20_bins():
    assert ORIGINAL_BINS == {"entropy": 100, "probability": 20}
    # total 800, half 400. Before bin 18, running = 0 + 1 + ... + 17 = 153; k = 18:
    # 153 <= 400 <= 453, stop: tau = 0.90 + (400 - 153) / 300 * 0.05 = 0.941167, capped by min().
    histograms = histograms_with({1: {18: 300, 19: 500}}, bins=20)
    assert original_thresholds(histograms, 0.95, "probability")[1].item() == pytest.approx(0.9411667, abs=1e-6)
    assert original_thresholds(histograms, 0.9, "probability")[1].item() == f32(0.9)


def test_original_thresholds_stay_on_the_histograms_device_and_refuse_bad_input():
    assert original_thresholds(histograms_with({}), FLOOR, "entropy").device == torch.device("cpu")
    with pytest.raises(ValueError, match="threshold mode"):
        original_thresholds(histograms_with({}), FLOOR, "median")
    with pytest.raises(ValueError, match="int64"):
        original_thresholds(torch.zeros(3, 100), FLOOR, "entropy")


# ---------------------------------------------------------------- the median variant

def test_median_interpolates_inside_the_half_bin():
    # 4 bins over [0, 2] (width 0.5), counts 1, 2, 1, 0: half 2; the cumulative count reaches 2 in
    # bin 1 (1 before it): (1 + (2 - 1) / 2) * 0.5 = 0.75. Class 0 is empty.
    histograms = histograms_with({1: {0: 1, 1: 2, 2: 1}}, num_classes=2, bins=4)
    assert median_thresholds(histograms, 2.0, 0.1, "entropy").tolist() == [0.1, 0.75]
    assert median_thresholds(histograms, 2.0, 0.5, "probability").tolist() == [0.0, 0.5]


@pytest.mark.parametrize("count", (1, 2, 999, 1000, 4001))
def test_median_is_within_one_bin_of_the_sorted_median(count):
    value_range = max_uncertainty(16, 21)
    values = value_range * torch.rand(count, dtype=torch.float64) ** 2
    histograms = torch.zeros(1, MEDIAN_BINS, dtype=torch.int64)
    ones = torch.ones(count, dtype=torch.bool)
    add_to_histograms(histograms, values, torch.zeros(count, dtype=torch.int64), ones, value_range)
    tau = median_thresholds(histograms, value_range, 0.0, "entropy")[0].item()
    width = value_range / MEDIAN_BINS
    lower_median = values.sort().values[(count - 1) // 2].item()
    assert abs(tau - lower_median) <= width
    if count % 2:
        assert abs(tau - torch.quantile(values, 0.5).item()) <= width


# ---------------------------------------------------------------- uncertainty and histograms

def test_entropy_uncertainty_matches_the_formula():
    old_logits = 3 * torch.randn(2, 4, 3, 3, dtype=torch.float64)
    u = entropy_uncertainty(old_logits, num_channels=6)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                p = torch.softmax(old_logits[b, :, i, j], dim=0)
                entropy = -(p * torch.log(p)).sum()
                expected = entropy / (4 * math.log(4) * math.log(6))
                assert u[b, i, j].item() == pytest.approx(expected.item(), abs=1e-8)


def test_uncertainty_range_and_half_precision():
    uniform = torch.zeros(1, 16, 2, 2, dtype=torch.float16)
    u = entropy_uncertainty(uniform, num_channels=21)
    assert u.dtype == torch.float32
    # u_max = 1 / (16 ln 21) = 0.0205 (VOC 15-5)
    assert max_uncertainty(16, 21) == pytest.approx(0.02053, abs=1e-5)
    assert_close(u, torch.full((1, 2, 2), max_uncertainty(16, 21)), rtol=1e-5)
    values, predicted = max_probability(torch.tensor([[[[0.0]], [[2.0]], [[1.0]]]], dtype=torch.bfloat16))
    assert values.dtype == torch.float32 and predicted.tolist() == [[[1]]]
    assert values.item() == pytest.approx(math.exp(2) / (1 + math.exp(2) + math.exp(1)), rel=1e-6)


def test_add_to_histograms_counts_masked_pixels():
    histograms = torch.zeros(3, 100, dtype=torch.int64)
    values = torch.tensor([[0.0, 0.0199, 0.5, 1.0, -1e-9, 2.0, 0.3]])
    predicted = torch.tensor([[0, 1, 1, 2, 2, 2, 0]])
    mask = torch.tensor([[True, True, True, True, True, True, False]])  # the last pixel is not counted
    add_to_histograms(histograms, values, predicted, mask)
    add_to_histograms(histograms, values[:, :1], predicted[:, :1], mask[:, :1])
    # bins: floor(100 v), capped at 99, negatives in 0: 0, 1, 50, 99, 0, 99
    expected = histograms_with({0: {0: 2}, 1: {1: 1, 50: 1}, 2: {99: 2, 0: 1}})
    assert torch.equal(histograms, expected)

    fine = torch.zeros(1, 4, dtype=torch.int64)
    # over [0, 0.02]: floor(0.011 / 0.02 * 4) = 2, floor(0.0049 / 0.02 * 4) = 0
    add_to_histograms(fine, torch.tensor([0.011, 0.0049]), torch.tensor([0, 0]), torch.tensor([True, True]), 0.02)
    assert fine.tolist() == [[1, 0, 1, 0]]


def test_ade_like_thresholds_accept_every_background_pixel():
    # ADE 100-50: u_max = 1 / (101 ln 151) = 0.002 < 0.005, so every pixel falls in bin 0 and the
    # original's thresholds lie in [0.005, 0.01] (classes the old model predicted) or at the floor.
    old_logits, labels = torch.randn(2, 101, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64)
    histograms = torch.zeros(151, 100, dtype=torch.int64)
    u = entropy_uncertainty(old_logits, 151)
    add_to_histograms(histograms, u, old_logits.argmax(dim=1), labels == 0)
    assert histograms[:, 1:].sum() == 0
    tau = original_thresholds(histograms, FLOOR, "entropy")
    predicted = histograms[:, 0] > 0
    assert ((tau[predicted] >= f32(0.005)) & (tau[predicted] <= f32(0.01))).all()  # half / count in [1/2, 1]
    assert (tau[~predicted] == f32(FLOOR)).all()
    relabelled = pseudo_label(labels, old_logits, "entropy", 101, 151, tau, adaptive_factor=True)
    assert torch.equal(relabelled.labels, old_logits.argmax(dim=1))
    assert_close(relabelled.image_weights, torch.full((2,), 64 / (64 + 1e-6)))


def test_median_thresholds_reject_about_half_of_the_background():
    old_logits, labels = 2 * torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.int64)
    value_range = max_uncertainty(3, 5)
    histograms = torch.zeros(5, MEDIAN_BINS, dtype=torch.int64)
    add_to_histograms(histograms, entropy_uncertainty(old_logits, 5), old_logits.argmax(dim=1), labels == 0,
                      value_range)
    tau = median_thresholds(histograms, value_range, 0.0, "entropy")
    accepted = pseudo_label(labels, old_logits, "entropy", 3, 5, tau).labels != IGNORE
    assert 0.49 <= accepted.float().mean().item() <= 0.51


# ---------------------------------------------------------------- relabelling, 2x2 images

C_OLD, C_T = 3, 5  # channels 0..2 old (background included), 3..4 new
LABELS = torch.tensor([
    [[0, 3], [IGNORE, 1]],  # background: (0, 0) label 0 and (1, 1) old class 1
    [[4, 4], [3, IGNORE]],  # no background pixel
])
# Old probabilities per pixel. Image 0: (0, 0) confident class 1, (1, 1) uncertain background.
PROBABILITIES = torch.tensor([
    [[[0.1, 0.6], [1 / 3, 0.40]],
     [[0.8, 0.2], [1 / 3, 0.35]],
     [[0.1, 0.2], [1 / 3, 0.25]]],
    [[[0.7, 0.1], [0.2, 0.5]],
     [[0.2, 0.8], [0.2, 0.3]],
     [[0.1, 0.1], [0.6, 0.2]]],
])
OLD_LOGITS = torch.log(PROBABILITIES)
# u = H / (3 ln 3 ln 5) = H / 5.3045:
# (0, 0): H(0.1, 0.8, 0.1) = 0.6390 -> u = 0.1205; (1, 1): H(0.4, 0.35, 0.25) = 1.0805 -> u = 0.2037
U_CONFIDENT, U_UNCERTAIN = 0.1205, 0.2037


def relabel(mode, **kwargs):
    labels = LABELS.clone()
    result = pseudo_label(labels, OLD_LOGITS, mode, C_OLD, C_T, **kwargs)
    assert torch.equal(labels, LABELS)  # the input is not modified
    assert result.labels.dtype == torch.int64
    return result


def test_the_example_uncertainties():
    u = entropy_uncertainty(OLD_LOGITS, C_T)
    assert u[0, 0, 0].item() == pytest.approx(U_CONFIDENT, abs=1e-4)
    assert u[0, 1, 1].item() == pytest.approx(U_UNCERTAIN, abs=1e-4)


def test_entropy_mode_and_adaptive_factor():
    tau = torch.tensor([0.15, 0.15, 0.15, 0.15, 0.15], dtype=torch.float64)
    result = relabel("entropy", thresholds=tau, adaptive_factor=True)
    # (0, 0): 0.1205 < tau[1] -> 1; (1, 1): 0.2037 >= tau[0] -> ignored; new and void kept.
    assert result.labels.tolist() == [[[1, 3], [IGNORE, IGNORE]], [[4, 4], [3, IGNORE]]]
    # nu_0 = 1 accepted / (2 background + 1e-6); image 1 has no background: 0 / (0 + 1e-6) = 0.
    assert_close(result.image_weights, torch.tensor([1 / (2 + 1e-6), 0.0]))
    assert result.image_weights.dtype == torch.float32 and result.pixel_weights is None


def test_entropy_mode_keeps_background_predictions_and_clamps_nu():
    tau = torch.tensor([0.21, 0.15, 0.15, 0.15, 0.15], dtype=torch.float64)
    result = relabel("entropy", thresholds=tau, adaptive_factor=True, min_factor=0.6)
    # (1, 1): 0.2037 < tau[0] = 0.21 -> 0, the old model's background.
    assert result.labels.tolist() == [[[1, 3], [IGNORE, 0]], [[4, 4], [3, IGNORE]]]
    # nu = 2 / (2 + 1e-6) and 0, clamped below at 0.6.
    assert_close(result.image_weights, torch.tensor([2 / (2 + 1e-6), 0.6]))
    assert relabel("entropy", thresholds=tau).image_weights is None


def test_naive_and_confidence_modes():
    expected = [[[1, 3], [IGNORE, 0]], [[4, 4], [3, IGNORE]]]
    naive = relabel("naive")
    assert naive.labels.tolist() == expected and naive.image_weights is None and naive.pixel_weights is None
    confidence = relabel("confidence")
    assert confidence.labels.tolist() == expected
    # the old max probability on background pixels, 1 elsewhere
    assert_close(confidence.pixel_weights, torch.tensor([[[0.8, 1.0], [1.0, 0.4]], [[1.0] * 2] * 2]))


def test_threshold_and_median_modes():
    # threshold_0.5: (0, 0) 0.8 >= 0.5 -> 1; (1, 1) 0.4 < 0.5 -> ignored.
    assert relabel("threshold_0.5").labels.tolist() == [[[1, 3], [IGNORE, IGNORE]], [[4, 4], [3, IGNORE]]]
    # median: (0, 0) 0.8 < tau[1] = 0.9 -> ignored; (1, 1) 0.4 >= tau[0] = 0.3 -> 0.
    tau = torch.tensor([0.3, 0.9, 0.9, 0.9, 0.9], dtype=torch.float64)
    assert relabel("median", thresholds=tau).labels.tolist() == [[[IGNORE, 3], [IGNORE, 0]], [[4, 4], [3, IGNORE]]]


def test_pseudo_label_refuses_bad_modes_and_arguments():
    for mode in ("entropy_0.5", "median_0.9", "threshold_5", "threshold_x", "threshold_0", "soft"):
        with pytest.raises(ValueError, match="pseudo mode"):
            relabel(mode)
    with pytest.raises(ValueError, match="thresholds"):
        relabel("entropy")
    with pytest.raises(ValueError, match="thresholds"):
        relabel("median", thresholds=torch.zeros(C_OLD))
    with pytest.raises(ValueError, match="adaptive factor"):
        relabel("naive", adaptive_factor=True)
    with pytest.raises(ValueError, match="channels"):
        pseudo_label(LABELS, OLD_LOGITS, "naive", C_OLD + 1, C_T)
    assert isinstance(relabel("naive"), PseudoLabels)
