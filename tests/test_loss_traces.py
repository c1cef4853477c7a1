"""Every method's numbers are unchanged: each iteration's loss terms of a fixed two-step synthetic
task in float64, and the sums of the weights and regularizer states of its step checkpoints,
equal the recording in tests/data/loss_traces.json (see tests/loss_traces.py)."""
import json

import pytest

from loss_traces import STEP0_RUNS, STEP1_RUNS, TRACES_PATH, record

# float64 over a few dozen iterations: rounding stays near 1e-15; a changed formula, order of
# operations on the weights or schedule moves these numbers by far more.
RELATIVE = 1e-9

# One worker records every run once (module fixture) and checks them all.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("loss-traces")]


@pytest.fixture(scope="module")
def traces(data_root, tmp_path_factory):
    return record(data_root, tmp_path_factory.mktemp("loss-traces"))


def test_recording_covers_every_method_and_run():
    from segmentation.methods import REGISTRY

    recorded = json.loads(TRACES_PATH.read_text())
    assert set(recorded) == set(STEP0_RUNS) | set(STEP1_RUNS)
    assert set(REGISTRY) <= set(recorded)


@pytest.mark.parametrize("run", [*STEP0_RUNS, *STEP1_RUNS])
def test_loss_terms_and_step_checkpoint_equal_the_recording(traces, run):
    expected = json.loads(TRACES_PATH.read_text())[run]
    actual = traces[run]
    assert len(actual["iterations"]) == len(expected["iterations"]) > 0
    for index, (terms, expected_terms) in enumerate(zip(actual["iterations"], expected["iterations"])):
        assert terms.keys() == expected_terms.keys(), f"iteration {index + 1}"
        for name, value in expected_terms.items():
            assert terms[name] == pytest.approx(value, rel=RELATIVE, abs=1e-300), f"iteration {index + 1}: {name}"
    assert actual["checkpoint"].keys() == expected["checkpoint"].keys()
    for name, value in expected["checkpoint"].items():
        assert actual["checkpoint"][name] == pytest.approx(value, rel=RELATIVE), name
