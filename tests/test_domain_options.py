"""Domain-incremental tasks on the command line: the task table, the methods' domain presets (PLOP's
Cityscapes scripts), the options refused there (each would crash or train on nothing, plop-spec
§13.8) and the data-root check of Cityscapes."""
import json

import pytest

from option_helpers import missing_file_error, option_workdir, usage_error  # noqa: F401 (a fixture)
from segmentation import tasks
from segmentation.domain_tasks import CITY_NAMES, DOMAIN_TASKS
from segmentation.engine.options import parse_options

DOMAIN = ["--dataset", "synthetic_domain", "--data_root", "unread-data"]


def test_domain_task_table_follows_the_spec():
    assert CITY_NAMES[:3] == ["aachen", "bremen", "darmstadt"] and CITY_NAMES[18:] == ["frankfurt", "lindau", "munster"]
    assert DOMAIN_TASKS["11-5"] == {0: list(range(11)), 1: list(range(11, 16)), 2: list(range(16, 21))}
    assert DOMAIN_TASKS["11-1"][0] == list(range(11)) and DOMAIN_TASKS["11-1"][10] == [20]
    assert len(DOMAIN_TASKS["11-1"]) == 11 and len(DOMAIN_TASKS["1-1"]) == 21
    assert all(DOMAIN_TASKS["1-1"][step] == [step] for step in range(21))


@pytest.mark.parametrize("dataset", tasks.DOMAIN_DATASETS)
def test_every_step_has_the_same_19_channels(dataset):
    assert tasks.num_steps(dataset, "11-1") == 11
    for step in (0, 1, 10):
        assert tasks.classes_per_step(dataset, "11-1", step) == [19]
        assert tasks.channel_order(dataset, "11-1", step) == list(range(19))
    assert tasks.old_classes_per_step(dataset, "11-1", 0) == []
    assert tasks.old_classes_per_step(dataset, "11-1", 3) == [19]
    # The class-incremental layout is unchanged.
    assert tasks.old_classes_per_step("voc", "15-1", 2) == [16, 1]


def test_mib_on_domains_is_plain_distillation():
    config = parse_options([*DOMAIN, "--task", "11-5", "--method", "MiB"])
    assert config.methods.loss_kd == 10.0
    assert not (config.methods.unce or config.methods.unkd or config.methods.init_balanced)
    assert config.label_protocol == "mib"


@pytest.mark.parametrize("task, logits_factor", [("11-5", 0.0001), ("11-1", 0.0001), ("1-1", 0.001)])
def test_plop_on_domains_is_local_pod_of_its_cityscapes_scripts(task, logits_factor):
    config = parse_options([*DOMAIN, "--task", task, "--method", "PLOP"])
    options = config.methods
    assert (options.pod, options.pod_factor, options.pod_logits) == ("local", 0.0001, True)
    assert json.loads(options.pod_options)["switch"]["after"]["factor"] == logits_factor
    assert options.pseudo is None and not options.init_balanced and not options.classif_adaptive_factor
    assert config.label_protocol == "mib"  # not used on domain datasets
    # PLOP's script line (FT with flags) parses to the same losses.
    script = parse_options([*DOMAIN, "--task", task, "--method", "FT", "--pod", "local", "--pod_factor", "0.0001",
                            "--pod_logits", "--pod_options", options.pod_options])
    assert script.methods == options


def test_class_tasks_keep_their_presets():
    config = parse_options(["--dataset", "synthetic", "--data_root", "unread-data", "--task", "15-5",
                            "--method", "MiB"])
    assert config.methods.unce and config.methods.unkd and config.methods.init_balanced


@pytest.mark.parametrize("extra, expected", [
    (["--method", "MiB", "--unce"], "--unce on --dataset synthetic_domain: every class is old"),
    (["--unkd", "--loss_kd", "10"], "--unkd on --dataset synthetic_domain"),
    (["--init_balanced"], "no background classifier"),
    (["--pseudo", "entropy"], "pseudo-labels would replace the ground truth"),
    (["--method", "LWF-MC"], "the ground truth would never be used"),
    (["--no_mask"], "--no_mask on --dataset synthetic_domain"),
    (["--test_on_val"], "--domain_split"),
    (["--split_dir", "."], "chosen by city"),
])
def test_options_that_cannot_work_on_domains_are_refused(extra, expected):
    assert expected in usage_error([*DOMAIN, "--task", "11-5", *extra])


def test_label_options_are_ignored_with_a_note():
    config = parse_options([*DOMAIN, "--task", "11-5", "--label_protocol", "plop", "--data_masking", "new"])
    assert (config.label_protocol, config.data_masking) == ("mib", "current")
    assert sum("ignored on --dataset synthetic_domain" in note for note in config.notes) == 2


def test_domain_split_choices():
    assert parse_options([*DOMAIN, "--task", "1-1"]).domain_split == "per_city"
    assert parse_options([*DOMAIN, "--task", "1-1", "--domain_split", "plop"]).domain_split == "plop"
    assert "--domain_split" in usage_error([*DOMAIN, "--task", "1-1", "--domain_split", "city"])


def test_unknown_domain_task_names_the_valid_ones():
    message = usage_error([*DOMAIN, "--task", "15-5"])
    assert "11-5" in message and "1-1" in message


@pytest.mark.usefixtures("option_workdir")
def test_missing_cityscapes_names_both_places(tmp_path):
    message = missing_file_error(["--dataset", "cityscapes_domain", "--task", "11-5", "--no_pretrained"])
    assert "data/cityscapes" in message and "leftImg8bit/" in message and "synthetic_domain" in message
    # PLOP's --data_root is the Cityscapes folder itself; our layout's is its parent.
    (tmp_path / "cs" / "leftImg8bit").mkdir(parents=True)
    assert parse_options(["--dataset", "cityscapes_domain", "--data_root", "cs", "--task", "11-5",
                          "--no_pretrained"]).dataset == "cityscapes_domain"
    (tmp_path / "data" / "cityscapes").mkdir()
    assert parse_options(["--dataset", "cityscapes_domain", "--task", "1-1", "--no_pretrained"]).task == "1-1"


@pytest.mark.usefixtures("option_workdir")
def test_plops_cityscapes_script_lines_parse(tmp_path):
    # As PLOP's scripts/cityscapesDomain/plop_cityscapesDomain_1-1.sh (plop-spec §13.9) write them, step 0 then 1.
    (tmp_path / "cityscapes" / "leftImg8bit").mkdir(parents=True)
    common = ["--data_root", "cityscapes", "--batch_size", "12", "--dataset", "cityscapes_domain", "--name", "PLOP",
              "--task", "1-1", "--overlap", "--opt_level", "O1", "--date", "2021-05-26", "--checkpoint",
              "checkpoints/step/", "--epochs", "50", "--method", "FT", "--pod", "local", "--pod_factor", "0.0001",
              "--pod_logits", "--no_pretrained"]
    step0 = parse_options([*common, "--step", "0", "--lr", "0.01"])
    logits = '{"switch": {"after": {"extra_channels": "sum", "factor": 0.001, "type": "local"}}}'
    step1 = parse_options([*common, "--step", "1", "--lr", "0.001", "--pod_options", logits])
    assert (step0.dataset, step0.task, step0.steps, step0.amp) == ("cityscapes_domain", "1-1", (0,), "fp16")
    assert step1.steps == (1,) and step1.incremental_lr is None and step1.lr == 0.001
    # The script's step 1 is what --method PLOP fills in on 1-1.
    assert step1.methods == parse_options([*DOMAIN, "--task", "1-1", "--method", "PLOP"]).methods
    assert step1.label_protocol == "mib" and step1.methods.pseudo is None
