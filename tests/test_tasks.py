import pytest

from segmentation import tasks
from segmentation.tasks import TASKS

# Tasks of the reference code, with their number of labels per step, read off its definitions.
REFERENCE_LAYOUTS = {
    ("voc", "offline"): [21],
    ("voc", "19-1"): [20, 1],
    ("voc", "19-1b"): [20, 1],
    ("voc", "15-5"): [16, 5],
    ("voc", "15-5s"): [16, 1, 1, 1, 1, 1],
    ("voc", "10-5-5"): [11, 5, 5],
    ("ade", "offline"): [151],
    ("ade", "100-50"): [101, 50],
    ("ade", "100-10"): [101, 10, 10, 10, 10, 10],
    ("ade", "50"): [51, 50, 50],
    ("ade", "100-50b"): [101, 50],
    ("ade", "100-10b"): [101, 10, 10, 10, 10, 10],
    ("ade", "50b"): [51, 50, 50],
    ("ade", "100-50c"): [101, 50],
    ("ade", "100-10c"): [101, 10, 10, 10, 10, 10],
    ("ade", "50c"): [51, 50, 50],
}


@pytest.mark.parametrize("dataset,task", sorted(REFERENCE_LAYOUTS))
def test_reference_task_layouts(dataset, task):
    last = tasks.num_steps(dataset, task) - 1
    assert tasks.classes_per_step(dataset, task, last) == REFERENCE_LAYOUTS[(dataset, task)]


@pytest.mark.parametrize("dataset", ["voc", "ade"])
def test_every_task_partitions_the_label_space(dataset):
    for name, steps in TASKS[dataset].items():
        labels = [label for step in steps.values() for label in step]
        assert sorted(labels) == list(range(tasks.NUM_LABELS[dataset])), name
        assert 0 in steps[0], name
        for step_labels in steps.values():
            assert step_labels == sorted(step_labels), name


def test_sequential_tasks_have_the_expected_steps():
    assert TASKS["voc"]["15-5"] == {0: list(range(16)), 1: [16, 17, 18, 19, 20]}
    assert TASKS["voc"]["19-1"][1] == [20]
    assert TASKS["voc"]["19-1b"][1] == [5]
    assert 5 not in TASKS["voc"]["19-1b"][0]
    assert TASKS["voc"]["10-5-5"][1] == [11, 12, 13, 14, 15]
    assert TASKS["ade"]["100-50"][1] == list(range(101, 151))
    assert TASKS["ade"]["100-10"][3] == list(range(121, 131))
    assert TASKS["ade"]["50"][1] == list(range(51, 101))


def test_aliases_of_later_papers():
    assert TASKS["voc"]["15-1"] == TASKS["voc"]["15-5s"]
    assert TASKS["ade"]["50-50"] == TASKS["ade"]["50"]
    assert TASKS["voc"]["10-1"] == {0: list(range(11)), **{s: [10 + s] for s in range(1, 11)}}
    assert TASKS["voc"]["5-3"][1] == [6, 7, 8] and TASKS["voc"]["5-3"][5] == [18, 19, 20]
    assert len(TASKS["voc"]["2-2"]) == 10 and TASKS["voc"]["2-2"][9] == [19, 20]
    assert tasks.classes_per_step("ade", "100-5", 10) == [101] + [5] * 10


@pytest.mark.parametrize("order", ["b", "c"])
def test_ade_alternative_orders_are_consistent(order):
    # Relations between the tasks of one class order that hold in the reference definitions.
    t50 = TASKS["ade"]["100-50" + order]
    t10 = TASKS["ade"]["100-10" + order]
    t5050 = TASKS["ade"]["50" + order]
    assert t10[0] == t50[0]
    assert sorted(sum((t10[s] for s in range(1, 6)), [])) == t50[1]
    assert t5050[2] == t50[1]
    assert sorted(t5050[0] + t5050[1]) == t50[0]
    assert t50[0] != TASKS["ade"]["100-50"][0]


def test_b_and_c_orders_differ():
    assert TASKS["ade"]["100-50b"][1] != TASKS["ade"]["100-50c"][1]


def test_step_helpers():
    assert tasks.labels_of_step("voc", "15-5s", 2) == [17]
    assert tasks.old_labels("voc", "15-5s", 2) == list(range(17))
    assert tasks.seen_labels("voc", "15-5s", 2) == list(range(18))
    assert tasks.future_labels("voc", "15-5s", 2) == [18, 19, 20]
    assert tasks.future_labels("voc", "15-5s", 5) == []
    assert tasks.old_labels("voc", "15-5", 0) == []
    assert tasks.classes_per_step("voc", "15-5s", 2) == [16, 1, 1]


def test_channel_order_renumbers_alternative_orders():
    order = tasks.channel_order("ade", "100-50b", 1)
    assert order[:101] == TASKS["ade"]["100-50b"][0]
    assert order[101:] == TASKS["ade"]["100-50b"][1]
    assert sorted(order) == list(range(151))
    assert tasks.channel_order("voc", "15-5", 1) == list(range(21))


def test_synthetic_uses_voc_tasks():
    assert TASKS["synthetic"] is TASKS["voc"]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: tasks.labels_of_step("coco", "15-5", 0), "valid datasets: ade, cityscapes_domain, synthetic, synthetic_domain, voc"),
        (lambda: tasks.labels_of_step("voc", "16-4", 0), "valid tasks: offline, 19-1"),
        (lambda: tasks.labels_of_step("voc", "15-5", 2), "valid steps: 0..1"),
        (lambda: tasks.classes_per_step("ade", "100-10", 6), "valid steps: 0..5"),
    ],
)
def test_unknown_dataset_task_or_step_lists_valid_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call()
