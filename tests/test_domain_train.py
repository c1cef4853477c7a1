"""Domain-incremental tasks through train.py on a tiny synthetic Cityscapes tree: one 19-class
classifier trained city after city, the test scored on the old cities, the new ones and all,
MiB's and PLOP's domain presets, PLOP's split mode, the results table, and an exact resume."""
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_once, copy_run
from train_cli_worker import (
    REPO_ROOT, assert_states_equal, model_state, printed, run_checkpoints, run_logs, run_train, run_train_forked,
    run_train_in_process, train_args,
)

# 5 images per city at 64x32: 4 trained on, 1 held out (--domain_split per_city). With 2 images per
# batch a one-city step has 2 iterations.
IMAGES_PER_CITY = 5
DOMAIN_SETTING = "synthetic_domain-1-1"


def domain_args(data_root, out, *extra, task="1-1", name="run"):
    args = train_args(data_root, out, "--crop_size", "32", "--batch_size", "2", *extra, task=task, name=name)
    args[args.index("--dataset") + 1] = "synthetic_domain"
    return args


@pytest.fixture(scope="session")
def domain_root(tmp_path_factory) -> str:
    from segmentation.data.synthetic_domain import generate_synthetic_domain

    def build(folder):
        generate_synthetic_domain(str(folder / "SyntheticCityscapes"), images_per_city=IMAGES_PER_CITY,
                                  width=64, height=32)

    return str(build_once(tmp_path_factory, "synthetic-domain-data", build))


@pytest.fixture(scope="session")
def ft_domain_run(domain_root, tmp_path_factory) -> Path:
    """Steps 0-2 of 1-1 (aachen, bremen, darmstadt) with FT, without in-step checkpoints (their
    interval does not change the weights)."""
    def build(folder):
        result = run_train_in_process(domain_args(domain_root, folder, "--step", "0", "1", "2"))
        (folder / "output.txt").write_text(printed(result))

    return build_once(tmp_path_factory, "ft-domain-run", build)


@pytest.mark.slow
def test_one_classifier_trained_city_after_city_and_scored_by_city(ft_domain_run):
    output = (ft_domain_run / "output.txt").read_text()
    assert "step 1: trains on bremen (1); validation on 1 images of this step's cities, test on 2 images of the 2 " \
           "cities seen so far" in output
    assert "every validation image is also a test image" in output
    for step, old, new in ((0, [], ["aachen"]), (1, ["aachen"], ["bremen"]), (2, ["aachen", "bremen"], ["darmstadt"])):
        results = json.loads((run_logs(ft_domain_run, DOMAIN_SETTING) / f"step{step}.json").read_text())
        assert (results["old_domains"], results["new_domains"]) == (old, new)
        assert results["class_names"][:2] == ["road", "sidewalk"] and len(results["class_iou"]) == 19
        assert results["miou_old"] is None and results["miou_all_fg"] is None  # no class groups, no background
        assert 0.0 <= results["miou_all"] <= 1.0 and 0.0 <= results["miou_new_domains"] <= 1.0
        assert (results["miou_old_domains"] is None) == (step == 0)
        assert f"step {step} test" in output
        saved = torch.load(run_checkpoints(ft_domain_run, DOMAIN_SETTING) / f"step{step}.pth", map_location="cpu",
                           weights_only=False)
        assert saved["classes"] == [19] and saved["channel_order"] == list(range(19))
        assert saved["model_state"]["cls.0.weight"].shape[0] == 19 and "cls.1.weight" not in saved["model_state"]

    # The summary has a table of its own for domain tasks: old cities, new cities, all.
    summary = run_train([str(ft_domain_run / "logs")], script=str(Path(REPO_ROOT) / "launch" / "summarize.py"),
                        launcher=[sys.executable])
    assert "### mIoU (%), domain-incremental, by city" in summary.stdout
    assert "synthetic_domain 1-1: old | synthetic_domain 1-1: new | synthetic_domain 1-1: all" in summary.stdout
    assert "with background" not in summary.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method, term", [("MiB", "loss_kd"), ("PLOP", "loss_pod"), ("LWF", "loss_kd"),
                                          ("ILT", "loss_de")])
def test_methods_train_a_domain_step_from_the_ft_step0(method, term, ft_domain_run, domain_root, tmp_path):
    step0 = run_checkpoints(ft_domain_run, DOMAIN_SETTING) / "step0.pth"
    extra = ("--spp_scales", "1", "2") if method == "PLOP" else ()
    result = run_train_in_process(domain_args(domain_root, tmp_path, "--method", method, "--step", "1",
                                              "--step_ckpt", str(step0), *extra))
    log = (run_logs(tmp_path, DOMAIN_SETTING) / "train.log").read_text()
    assert f" {term} " in log, printed(result)
    results = json.loads((run_logs(tmp_path, DOMAIN_SETTING) / "step1.json").read_text())
    assert results["method"] == method and results["old_domains"] == ["aachen"]
    if method in ("MiB", "PLOP"):  # the domain presets: nothing of the class-incremental ones that breaks here
        options = results["options"]
        assert not (options["unce"] or options["unkd"] or options["init_balanced"] or options["pseudo"])


@pytest.mark.slow
def test_killed_domain_step_resumes_bit_identically(ft_domain_run, domain_root, tmp_path):
    out = copy_run(ft_domain_run, tmp_path)
    for step in (1, 2):
        (run_checkpoints(out, DOMAIN_SETTING) / f"step{step}.pth").unlink()
        (run_logs(out, DOMAIN_SETTING) / f"step{step}.json").unlink()
    args = domain_args(domain_root, out, "--step", "1", "2", "--ckpt_interval", "1")
    result = run_train_forked(args, check=False, env={"SEGMENTATION_FAULT": "kill:train-iteration:2"})
    assert result.returncode < 0, printed(result)
    assert (run_checkpoints(out, DOMAIN_SETTING) / "step1-iter1.pth").exists(), printed(result)
    output = printed(run_train_in_process(args))
    assert "step 1: resumed from iteration 1" in output
    for step in (1, 2):
        assert_states_equal(model_state(run_checkpoints(out, DOMAIN_SETTING) / f"step{step}.pth"),
                            model_state(run_checkpoints(ft_domain_run, DOMAIN_SETTING) / f"step{step}.pth"))


def test_plop_split_mode_tests_on_the_validation_images_at_step_0(domain_root, tmp_path):
    result = run_train_in_process(domain_args(domain_root, tmp_path, "--step", "0", "--domain_split", "plop",
                                              "--epochs", "1"))
    output = printed(result)
    assert "the original's split (--domain_split plop" in output
    assert "the validation images are the test images" in output
    results = json.loads((run_logs(tmp_path, DOMAIN_SETTING) / "step0.json").read_text())
    assert results["options"]["domain_split"] == "plop"


@pytest.mark.slow
def test_domain_benchmark_writes_the_table_and_restarts_without_training(domain_root, tmp_path):
    script = str(Path(REPO_ROOT) / "launch" / "benchmark_domains.py")
    argv = ["--out", str(tmp_path), "--data_root", domain_root, "--methods", "FT,Joint", "--step0_epochs", "1",
            "--epochs", "1", "--batch_size", "4", "--crop_size", "32"]
    first = run_train(argv, script=script, launcher=[sys.executable]).stdout
    assert "2 runs in" in first  # FT's steps 1-2 and Joint, after the shared step 0
    assert (tmp_path / "checkpoints" / "synthetic_domain-11-5" / "FT" / "step0.pth").is_symlink()
    rows = {line.split(" | ")[0] for line in first.splitlines() if line.startswith("| ")}
    assert {"| FT/FT", "| -/Joint", "| -/step0-shared"} <= rows
    report = (tmp_path / "results.md").read_text()
    assert "synthetic_domain 11-5: old | synthetic_domain 11-5: new | synthetic_domain 11-5: all" in report
    assert "0 runs in" in run_train(argv, script=script, launcher=[sys.executable]).stdout
