"""EWC, PI and RW (spec §5.5): importance updates and penalties against hand-computed values on a
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


def test_min_max_normalisation():
    assert torch.equal(normalize_importance(_t([2.0, 4.0, 3.0])), _t([0.0, 1.0, 0.5]))
    assert torch.equal(normalize_importance(_t([3.0, 3.0])), _t([0.0, 0.0]))


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


def test_rw_score_every_k_iterations_and_saved_score():
    model = Tiny([1.0, 2.0])
    rw = RW(model, None, None, weight=100.0, alpha=0.9, iterations=2)
    _set(model, old=[1.5, 2.0], grad_old=[1.0, 2.0])
    rw.update()  # iteration 1: Fisher only
    fisher1 = 0.9 * _t([1.0, 4.0]) + 0.1
    assert torch.allclose(rw.fisher["old"], fisher1)
    assert torch.equal(rw.score["old"], _t([0.0, 0.0]))
    _set(model, old=[2.0, 1.0], grad_old=[-1.0, 3.0])
    rw.update()  # iteration 2: Fisher, then score against the weights at the start
    fisher2 = 0.9 * _t([1.0, 9.0]) + 0.1 * fisher1
    assert torch.allclose(rw.fisher["old"], fisher2)
    moved = _t([1.0, -1.0])  # theta - theta_prev
    score = _t([-1.0, 3.0]) * -moved / (0.5 * fisher2 * moved ** 2 + 1e-8)
    assert torch.allclose(rw.score["old"], score)
    state = rw.step_state()
    assert torch.allclose(state["score"]["old"], 0.5 * score.clamp(min=0))
    assert torch.allclose(state["fisher"]["old"], fisher2)


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
