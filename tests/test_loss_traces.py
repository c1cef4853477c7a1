"""Every method's numbers are unchanged: each iteration's loss terms of a fixed two-step synthetic
task in float64, and the sums of the weights and regularizer states of its step checkpoints,
equal the recording in tests/data/loss_traces.json (see tests/loss_traces.py)."""
import json

import pytest

from conftest import FLOAT64_PLOP_GROUP
from loss_traces import PLOP_RUNS, STEP0_RUNS, STEP1_RUNS, TRACES_PATH, record

# float64 over a few iterations: rounding stays near 1e-15; a changed formula, order of
# operations on the weights or schedule moves these numbers by far more.
RELATIVE = 1e-9


def _differences(expected, actual):
    """What differs between one run's recorded and fresh trace, one line each."""
    found = []
    if len(actual["iterations"]) != len(expected["iterations"]):
        return [f"{len(actual['iterations'])} iterations instead of {len(expected['iterations'])}"]
    for index, (terms, expected_terms) in enumerate(zip(actual["iterations"], expected["iterations"]), 1):
        if terms.keys() != expected_terms.keys():
            found.append(f"iteration {index}: terms {sorted(terms)} instead of {sorted(expected_terms)}")
            continue
        found += [f"iteration {index}: {name} {terms[name]!r} instead of {value!r}"
                  for name, value in expected_terms.items() if terms[name] != pytest.approx(value, rel=RELATIVE)]
    if actual["checkpoint"].keys() != expected["checkpoint"].keys():
        found.append(f"step checkpoint sums {sorted(actual['checkpoint'])} instead of {sorted(expected['checkpoint'])}")
    else:
        found += [f"step checkpoint: {name} {actual['checkpoint'][name]!r} instead of {value!r}"
                  for name, value in expected["checkpoint"].items()
                  if actual["checkpoint"][name] != pytest.approx(value, rel=RELATIVE)]
    return found


def test_recording_covers_every_method():
    from segmentation.methods import REGISTRY

    recorded = json.loads(TRACES_PATH.read_text())
    assert set(recorded) == set(STEP0_RUNS) | set(STEP1_RUNS)
    assert set(REGISTRY) <= set(recorded)
    assert all(len(trace["iterations"]) > 0 for trace in recorded.values())


@pytest.mark.slow
@FLOAT64_PLOP_GROUP
def test_every_methods_loss_terms_and_step_checkpoints_equal_the_recording(data_root, float64_plop_runs, tmp_path):
    expected = json.loads(TRACES_PATH.read_text())
    # The PLOP runs are recorded once per session (shared with test_plop_train.py), the others here.
    actual = {**json.loads((float64_plop_runs / "traces.json").read_text()),
              **record(data_root, tmp_path, [run for run in [*STEP0_RUNS, *STEP1_RUNS] if run not in PLOP_RUNS])}
    differences = {run: _differences(expected[run], actual[run]) for run in expected}
    assert not any(differences.values()), "\n".join(
        f"{run}: {line}" for run, lines in differences.items() for line in lines)
