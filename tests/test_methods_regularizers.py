"""EWC, PI and RW as the original computes them: importance updates and penalties against hand-computed values on a
two-parameter model, and the state round trip through a checkpoint file."""
import pytest
import torch
import torch.nn as nn

from segmentation.methods.regularizer import (
    EWC, PI, REGULARIZERS, RW, build_regularizer, normalize_importance,
)


class Tiny(nn.Module):
    """``old`` exists at step t-1, ``new`` is the classifier added at step t."""

    def __init__(self, old, new=(0.5,)):
        super().__init__()
        self.old = nn.Parameter(torch.tensor(old, dtype=torch.float64))
        self.new = nn.Parameter(torch.tensor(new, dtype=torch.float64))


def _set(model, old=None, grad_old=None, grad_new=None):
    with torch.no_grad():
        if old is not None:
            model.old.copy_(torch.tensor(old, dtype=torch.float64))
    model.old.grad = None if grad_old is None else torch.tensor(grad_old, dtype=torch.float64)
    model.new.grad = None if grad_new is None else torch.tensor(grad_new, dtype=torch.float64)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_min_max_normalisation_divides_by_the_span_plus_1e_8_as_the_original():
    values = _t([2.0, 4.0, 3.0])
    assert torch.equal(normalize_importance(values), (values - 2.0) / (2.0 + 1e-8))
    assert torch.equal(normalize_importance(_t([3.0, 3.0])), _t([0.0, 0.0]))
    # Squared gradients of size 1e-5 spread over 2e-10: the largest stays far below 1.
    fisher = _t([1e-10, 3e-10, 2e-10])
    assert torch.allclose(normalize_importance(fisher), _t([0.0, 2e-10, 1e-10]) / (2e-10 + 1e-8), rtol=1e-12)
    assert normalize_importance(fisher).max().item() == pytest.approx(0.0196, abs=1e-4)


def test_ewc_penalty_uses_the_original_normalisation_of_a_small_fisher():
    previous = {"name": "ewc", "fisher": {"old": _t([1e-10, 5e-10, 3e-10])}}
    model = Tiny([1.0, 1.0, 1.0])
    ewc = EWC(model, previous, {"old": _t([0.0, 0.0, 0.0])}, weight=500.0)
    _set(model, grad_old=[0.0, 0.0, 0.0])
    importance = _t([0.0, 4e-10, 2e-10]) / (4e-10 + 1e-8)
    assert ewc.apply_penalty().item() == pytest.approx(500.0 * importance.sum().item(), rel=1e-12)
    assert torch.allclose(model.old.grad, 2 * 500.0 * importance, rtol=1e-12)


def test_registry_maps_regularizer_names_to_classes():
    assert REGULARIZERS == {"ewc": EWC, "pi": PI, "rw": RW}


def test_ewc_fisher_is_an_ema_of_squared_gradients_starting_from_ones():
    model = Tiny([1.0, 2.0])
    ewc = EWC(model, None, None, weight=500.0, alpha=0.9)
    _set(model, grad_old=[2.0, -1.0], grad_new=[3.0])
    ewc.update()
    assert torch.allclose(ewc.fisher["old"], _t([0.9 * 4 + 0.1, 0.9 * 1 + 0.1]))
    assert torch.allclose(ewc.fisher["new"], _t([0.9 * 9 + 0.1]))
    _set(model, grad_old=[0.0, 1.0])  # no gradient for "new": its Fisher stays
    ewc.update()
    assert torch.allclose(ewc.fisher["old"], _t([0.1 * 3.7, 0.9 + 0.1 * 1.0]))
    assert torch.allclose(ewc.fisher["new"], _t([8.2]))
    assert ewc.apply_penalty() is None  # step 0: nothing to penalise


def test_ewc_continues_the_previous_fisher_and_penalises_old_parameters_only():
    previous = {"name": "ewc", "fisher": {"old": _t([1.0, 3.0, 2.0])}}
    reference = {"old": _t([0.0, 0.0, 0.0])}
    model = Tiny([1.0, 2.0, -1.0])
    ewc = EWC(model, previous, reference, weight=500.0, alpha=0.9)
    assert torch.equal(ewc.fisher["old"], _t([1.0, 3.0, 2.0]))  # continued, not normalised
    assert torch.equal(ewc.fisher["new"], _t([1.0]))
    _set(model, grad_old=[0.0, 0.0, 0.0], grad_new=[0.0])
    penalty = ewc.apply_penalty()
    normalised = _t([0.0, 1.0, 0.5])
    assert penalty.item() == pytest.approx(500.0 * (0 * 1 + 1 * 4 + 0.5 * 1))
    assert torch.allclose(model.old.grad, 2 * 500.0 * normalised * _t([1.0, 2.0, -1.0]))
    assert torch.equal(model.new.grad, _t([0.0]))


def test_penalty_gradient_equals_autograd_and_reg_no_normalize_uses_raw_importance():
    previous = {"name": "ewc", "fisher": {"old": _t([1.0, 3.0])}}
    reference = {"old": _t([0.5, -0.5])}
    model = Tiny([1.0, 2.0])
    ewc = EWC(model, previous, reference, weight=7.0, normalize=False)
    _set(model, grad_old=[0.25, 0.0])
    penalty = ewc.apply_penalty()
    theta = model.old.detach().clone().requires_grad_(True)
    expected = 7.0 * (_t([1.0, 3.0]) * (theta - reference["old"]) ** 2).sum()
    expected.backward()
    assert penalty.item() == pytest.approx(expected.item())
    assert torch.allclose(model.old.grad, _t([0.25, 0.0]) + theta.grad)


def test_penalty_gradient_of_a_weight_without_loss_gradient():
    # A weight the loss did not reach has no .grad: it receives the penalty's gradient alone.
    previous = {"name": "ewc", "fisher": {"old": _t([1.0, 3.0])}}
    reference = {"old": _t([0.5, -0.5])}
    model = Tiny([1.0, 2.0])
    ewc = EWC(model, previous, reference, weight=7.0, normalize=False)
    _set(model)
    assert model.old.grad is None
    ewc.apply_penalty()
    assert torch.allclose(model.old.grad, 2 * 7.0 * _t([1.0, 3.0]) * _t([0.5, 2.5]))


def test_pi_path_integral_and_end_of_step_score():
    model = Tiny([1.0, 2.0], new=[0.0])
    pi = PI(model, None, None, weight=500.0)
    # Iteration 1 at the start point: no displacement yet.
    _set(model, grad_old=[1.0, 1.0], grad_new=[1.0])
    pi.update()
    assert torch.equal(pi.delta["old"], _t([0.0, 0.0]))
    # Iteration 2: the parameters moved by (-0.5, +1.0) since the last update.
    _set(model, old=[0.5, 3.0], grad_old=[2.0, 4.0], grad_new=None)
    pi.update()
    delta = _t([2.0 * 0.5, 4.0 * -1.0])  # g * (theta_prev - theta_now)
    assert torch.allclose(pi.delta["old"], delta)
    state = pi.step_state()
    moved = _t([0.25, 1.0])  # (theta_end - theta_start)^2
    assert torch.allclose(state["score"]["old"], (delta / (moved + 1e-20)).clamp(min=0))
    assert torch.equal(state["score"]["new"], _t([0.0]))  # never moved: 0 / 1e-20


def test_pi_adds_the_previous_score_and_penalises_with_it():
    previous = {"name": "pi", "score": {"old": _t([2.0, 6.0])}}
    model = Tiny([1.0, 2.0])
    pi = PI(model, previous, {"old": _t([1.0, 1.0])}, weight=500.0)
    _set(model, grad_old=[0.0, 0.0])
    assert pi.apply_penalty().item() == pytest.approx(500.0 * (0 * 0 + 1 * 1))
    assert torch.allclose(pi.step_state()["score"]["old"], _t([2.0, 6.0]))  # no movement this step


def test_pi_measures_the_step_from_the_old_models_weights_not_the_start():
    # --init_balanced moved the background bias before the step: the start (0.0, 2.0) differs
    # from the old model's weights (1.0, 2.0) in the first entry. The original divides the path
    # integral by the squared distance from the old model's weights.
    old_weights = {"old": _t([1.0, 2.0])}
    previous = {"name": "pi", "score": {"old": _t([0.5, 0.25])}}
    model = Tiny([0.0, 2.0], new=[0.0])
    pi = PI(model, previous, old_weights, weight=500.0)
    _set(model, grad_old=[1.0, 1.0], grad_new=[1.0])
    pi.update()
    _set(model, old=[0.5, 1.0], grad_old=[-2.0, 4.0], grad_new=[3.0])
    pi.update()
    delta = _t([-2.0 * (0.0 - 0.5), 4.0 * (2.0 - 1.0)])
    expected = (delta / ((_t([0.5, 1.0]) - old_weights["old"]) ** 2 + 1e-20)).clamp(min=0) + _t([0.5, 0.25])
    state = pi.step_state()
    assert torch.allclose(state["score"]["old"], expected, rtol=1e-12)
    assert torch.equal(state["score"]["new"], _t([0.0]))  # a new weight: measured from its start

    # An estimating PI (--estimate_importance pi, no penalty) measures from the same origin.
    model = Tiny([0.0, 2.0], new=[0.0])
    estimating = PI(model, previous, old_weights, weight=500.0, penalize=False)
    assert not estimating.penalizes
    _set(model, grad_old=[1.0, 1.0], grad_new=[1.0])
    estimating.update()
    _set(model, old=[0.5, 1.0], grad_old=[-2.0, 4.0], grad_new=[3.0])
    estimating.update()
    assert estimating.apply_penalty() is None
    assert torch.allclose(estimating.step_state()["score"]["old"], expected, rtol=1e-12)


# RW with a period of 2 over five iterations: weights and gradients of the "old" parameter at each
# call of update(), i.e. after the backward of iterations 0..4. The one-entry "new" classifier
# follows the first entry.
RW_WEIGHTS = [[1.0, 2.0], [1.5, 2.0], [2.0, 1.0], [2.5, 1.5], [1.0, 0.5]]
RW_GRADIENTS = [[1.0, 2.0], [-1.0, 3.0], [-0.5, -1.0], [2.0, 1.0], [2.0, -0.5]]


def _run_rw(rw, model, begin=0, end=5):
    for weight, gradient in list(zip(RW_WEIGHTS, RW_GRADIENTS))[begin:end]:
        with torch.no_grad():
            model.new.copy_(_t(weight[:1]))
        _set(model, old=weight, grad_old=gradient, grad_new=gradient[:1])
        rw.update()


def _rw_fishers(start):
    """The Fisher before each call: F_0 = start, F_{c+1} = 0.9 g_c^2 + 0.1 F_c."""
    fishers = [start]
    for gradient in RW_GRADIENTS:
        fishers.append(0.9 * _t(gradient) ** 2 + 0.1 * fishers[-1])
    return fishers


def _rw_term(fisher, call, since):
    """The original's score increment at ``call`` against the weights of call ``since``:
    g (theta_k - theta) / (0.5 F (theta - theta_k)^2 + 1e-8)."""
    moved = _t(RW_WEIGHTS[call]) - _t(RW_WEIGHTS[since])
    return _t(RW_GRADIENTS[call]) * -moved / (0.5 * fisher * moved ** 2 + 1e-8)


def _rw_score(fisher_start):
    """Score after the five calls: terms at calls 2 and 4, each with the Fisher before that call."""
    fishers = _rw_fishers(fisher_start)
    return _rw_term(fishers[2], 2, 0) + _rw_term(fishers[4], 4, 2)


def test_rw_scores_at_calls_0_k_2k_with_the_fisher_before_the_update():
    model = Tiny(RW_WEIGHTS[0], new=[1.0])
    rw = RW(model, None, None, weight=100.0, alpha=0.9, iterations=2)
    fishers = _rw_fishers(_t([1.0, 1.0]))
    _run_rw(rw, model, 0, 2)  # call 0 only remembers the weights, call 1 is off-period
    assert torch.equal(rw.score["old"], _t([0.0, 0.0]))
    _run_rw(rw, model, 2, 3)  # call 2: against call 0's weights, with the Fisher of calls 0-1
    first = _rw_term(fishers[2], 2, 0)
    assert torch.allclose(rw.score["old"], first, rtol=1e-12)
    _run_rw(rw, model, 3, 5)  # call 4: against call 2's weights, with the Fisher of calls 0-3
    assert torch.allclose(rw.score["old"], first + _rw_term(fishers[4], 4, 2), rtol=1e-12)
    assert torch.allclose(rw.fisher["old"], fishers[5], rtol=1e-12)  # every call updates the Fisher


def test_rw_saved_score_is_averaged_only_where_a_previous_score_exists():
    score = _rw_score(_t([1.0, 1.0]))
    assert score[0] > 0 > score[1]  # the clamp is exercised

    # Step 0: nothing to average with, the full score is kept.
    model = Tiny(RW_WEIGHTS[0], new=[1.0])
    rw = RW(model, None, None, weight=100.0, alpha=0.9, iterations=2)
    _run_rw(rw, model)
    state = rw.step_state()
    assert torch.allclose(state["score"]["old"], score.clamp(min=0), rtol=1e-12)
    assert torch.allclose(state["fisher"]["old"], _rw_fishers(_t([1.0, 1.0]))[5], rtol=1e-12)

    # Step t > 0: 0.5 (max(s, 0) + s_old) where a previous score exists; the new classifier keeps
    # its full score.
    fisher_before, score_before = _t([2.0, 0.5]), _t([4.0, 6.0])
    previous = {"name": "rw", "fisher": {"old": fisher_before}, "score": {"old": score_before}}
    model = Tiny(RW_WEIGHTS[0], new=[1.0])
    rw = RW(model, previous, {"old": _t([0.0, 0.0])}, weight=100.0, alpha=0.9, iterations=2)
    _run_rw(rw, model)
    state = rw.step_state()
    expected_old = 0.5 * (_rw_score(fisher_before).clamp(min=0) + score_before)
    assert torch.allclose(state["score"]["old"], expected_old, rtol=1e-12)
    assert torch.allclose(state["score"]["new"], score[:1].clamp(min=0), rtol=1e-12)
    assert state["score"]["new"].item() > 0


def test_rw_penalty_uses_normalised_fisher_plus_normalised_score():
    previous = {"name": "rw", "fisher": {"old": _t([1.0, 5.0, 3.0])}, "score": {"old": _t([4.0, 0.0, 2.0])}}
    model = Tiny([1.0, 1.0, 1.0])
    rw = RW(model, previous, {"old": _t([0.0, 0.0, 0.0])}, weight=100.0)
    _set(model, grad_old=[0.0, 0.0, 0.0])
    importance = _t([0.0, 1.0, 0.5]) + _t([1.0, 0.0, 0.5])
    assert rw.apply_penalty().item() == pytest.approx(100.0 * importance.sum().item())


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_state_round_trip_through_a_file_continues_identically(name, tmp_path):
    def make():
        model = Tiny([1.0, 2.0])
        return model, build_regularizer(name, model, None, None, weight=1.0, normalize=True, alpha=0.9,
                                        iterations=2)

    def iterate(model, regularizer, k):
        _set(model, old=[1.0 + k, 2.0 - 0.5 * k], grad_old=[0.1 * k, -0.3 * k], grad_new=[0.2 * k])
        regularizer.update()

    model_a, a = make()
    for k in range(3):
        iterate(model_a, a, k)
    torch.save(a.state_dict(), tmp_path / "state.pth")
    for k in range(3, 6):
        iterate(model_a, a, k)

    model_b, b = make()
    with torch.no_grad():
        model_b.old.copy_(_t([3.0, 1.0]))
    b.load_state_dict(torch.load(tmp_path / "state.pth", weights_only=False))
    for k in range(3, 6):
        iterate(model_b, b, k)
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.step_state().items():
        if key != "name":
            for tensor_name in value:
                assert torch.equal(value[tensor_name], b.step_state()[key][tensor_name]), (key, tensor_name)


def test_state_of_another_regularizer_is_refused():
    model = Tiny([1.0, 2.0])
    with pytest.raises(ValueError, match="'ewc'"):
        PI(model, None, None, weight=1.0).load_state_dict(EWC(model, None, None, weight=1.0).state_dict())


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_a_frozen_parameter_is_neither_watched_nor_penalised_and_keeps_its_importance(name):
    # --freeze (the body) and --fix_bn (norm affine parameters) leave parameters without gradients:
    # nothing is learnt about them in this step, so the next step gets their importance as it came.
    keys = REGULARIZERS[name].importance_keys
    previous = {"name": name, **{key: {"old": _t([0.5, 2.0]), "new": _t([1.0])} for key in keys}}
    model = Tiny([1.0, 2.0])
    model.old.requires_grad_(False)
    regularizer = build_regularizer(name, model, previous, {"old": _t([0.0, 0.0]), "new": _t([0.0])},
                                    weight=1.0, normalize=False, alpha=0.9, iterations=1)
    assert list(regularizer.parameters) == ["new"]
    _set(model, grad_new=[3.0])
    regularizer.update()
    regularizer.apply_penalty()
    assert model.old.grad is None
    state = regularizer.step_state()
    for key in keys:
        assert set(state[key]) == {"old", "new"}
        assert torch.equal(state[key]["old"], previous[key]["old"])
