"""The run's files: the same-name comparison, the files --overwrite replaces, the cleanup of a
failed launch, the lock, and rank 0 as the only writer."""
import json

import pytest
import torch

from option_helpers import synthetic_config
from segmentation.engine import run_files
from segmentation.engine.run_files import RunFiles, differing_options, files_of_steps, remove_created, stored_options
from segmentation.engine.run_lock import RunLockedError
from segmentation.errors import UsageError

BASE = {"lr": 0.01, "incremental_lr": 0.001, "loss_kd": 10.0, "num_workers": 2, "pretrained": "w.pth",
        "name": "exp", "steps": [0, 1]}


def test_differing_options_compares_what_changes_the_result_of_the_step():
    assert differing_options(BASE, dict(BASE, num_workers=8, steps=[1], name="x"), 1) == []
    assert differing_options(BASE, dict(BASE, loss_kd=100.0), 1) == ["--loss_kd 10.0 -> 100.0"]
    # In-Place ABN's kernels and the process-group backend change rounding at most; TF32 changes every convolution.
    hardware = dict(BASE, norm_kernels="auto", dist_backend="auto", tf32="on")
    assert differing_options(hardware, dict(hardware, norm_kernels="reference", dist_backend="gloo"), 1) == []
    assert differing_options(hardware, dict(hardware, tf32="off"), 1) == ["--tf32 on -> off"]
    # The learning rate of the step counts: --step 1 --lr 0.001 equals --step all --lr 0.01 --incremental_lr 0.001.
    assert differing_options(BASE, dict(BASE, lr=0.001, incremental_lr=None), 1) == []
    assert differing_options(BASE, dict(BASE, lr=0.001, incremental_lr=None), 0) == [
        "learning rate of step 0 0.01 -> 0.001"]
    # ImageNet weights only matter at step 0; options one side does not know are left out.
    assert differing_options(BASE, dict(BASE, pretrained=None), 1) == []
    assert differing_options(BASE, dict(BASE, pretrained=None), 0) == ["--pretrained w.pth -> None"]
    assert differing_options(BASE, dict(BASE, new_option=True), 0) == []
    # A step-0 model does not depend on the options that act from step 1 on, nor on the method's name.
    assert differing_options(BASE, dict(BASE, loss_kd=100.0, method="MiB", task="15-1"), 0) == []
    assert differing_options(BASE, dict(BASE, weight_decay=0.001, method="MiB"), 0) == []  # unknown to BASE
    assert differing_options(dict(BASE, weight_decay=0.0001), dict(BASE, weight_decay=0.001, method="MiB"), 0) == [
        "--weight_decay 0.0001 -> 0.001"]


def test_remove_created_keeps_folders_with_finished_files(tmp_path):
    kept, removed = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for folder in (kept, removed):
        (folder / "step0").mkdir(parents=True)
        (folder / "step0" / "events.out").write_text("x")
    (kept / "step0.json").write_text("{}")
    remove_created([tmp_path / "a", kept, tmp_path / "b", removed])
    assert (kept / "step0.json").exists() and not (tmp_path / "b").exists()


def test_stored_options_of_a_half_finished_step(tmp_path):
    checkpoints, logs = tmp_path / "ck", tmp_path / "logs"
    checkpoints.mkdir()
    assert stored_options(checkpoints, logs, 0) is None
    torch.save({"options": dict(BASE, loss_kd=1.0)}, checkpoints / "step0-iter4.pth")
    torch.save({"options": dict(BASE, loss_kd=2.0), "processes": 2}, checkpoints / "step0-iter8.pth")
    options, path = stored_options(checkpoints, logs, 0)  # the newest in-step checkpoint
    assert (options["loss_kd"], options["processes"], path) == (2.0, 2, checkpoints / "step0-iter8.pth")
    torch.save({"options": dict(BASE, loss_kd=3.0)}, checkpoints / "step0.pth")
    options, path = stored_options(checkpoints, logs, 0)  # the step-final one first
    assert (options["loss_kd"], "processes" in options, path) == (3.0, False, checkpoints / "step0.pth")


def test_the_global_batch_counts_not_its_split_over_processes():
    two_by_four = dict(BASE, batch_size=4, processes=2)
    for step in (0, 1):
        assert differing_options(two_by_four, dict(BASE, batch_size=8, processes=1), step) == []
        assert differing_options(two_by_four, dict(BASE, batch_size=1, processes=8), step) == []
        assert differing_options(two_by_four, dict(BASE, batch_size=4, processes=1), step) == [
            "global batch 8 (4 per process x 2 processes) -> 4 (4 per process x 1 process)"]
    # Files written before the number of processes was stored: --batch_size itself is compared.
    assert differing_options(dict(BASE, batch_size=4), dict(BASE, batch_size=8, processes=1), 1) == [
        "--batch_size 4 -> 8"]
    assert differing_options(dict(BASE, batch_size=4), dict(BASE, batch_size=4, processes=2), 1) == []


def test_overwrite_removes_the_files_of_the_replaced_steps_only(tmp_path):
    checkpoints, logs = tmp_path / "ck", tmp_path / "logs"
    kept = [checkpoints / "step0.pth", logs / "step0.json", logs / "step0" / "events.out.tfevents.1.host",
            logs / "test" / "events.out.tfevents.1.host.a.b.step0", logs / "train.log"]
    replaced = [checkpoints / "step1.pth", checkpoints / "step1-iter4.pth", checkpoints / "step2.pth.corrupt",
                logs / "step1.json", logs / "eval-step1.json", logs / "step1",
                logs / "test" / "events.out.tfevents.2.host.a.b.step1", logs / "eval" / "events.out.tfevents.3.host.step2"]
    for path in kept + replaced:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name != "step1":
            path.write_text("")
    (logs / "step1").mkdir(exist_ok=True)
    assert sorted(files_of_steps(checkpoints, logs, 1)) == sorted(replaced)


@pytest.fixture
def config(tmp_path):
    return synthetic_config("--checkpoint_dir", str(tmp_path / "ck"), "--logdir", str(tmp_path / "logs"),
                            "--name", "run", "--step", "all")


def test_only_rank_0_writes(config, tmp_path, monkeypatch):
    monkeypatch.setattr(run_files.distributed, "is_main_process", lambda: False)
    files = RunFiles(config)
    files.create_folders()
    assert not (tmp_path / "ck").exists() and files.created == []
    files.in_step_writer(0).save({"x": 1}, 4)
    files.write_results({"miou": 1.0}, files.results(0))
    files.save_step_checkpoint({"x": 1}, 0, verify=lambda path: pytest.fail("rank 1 read back a write"))
    files.open_run_log()
    files.lock()
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_rank_0_writes_and_cleans_up_what_it_created(config, tmp_path):
    files = RunFiles(config)
    files.create_folders()
    assert files.created[0] == tmp_path / "ck" and (tmp_path / "logs" / "synthetic-15-5" / "run").is_dir()
    files.in_step_writer(0).save({"x": 1}, 4)
    assert files.in_step(0).paths() == [files.checkpoint_dir / "step0-iter4.pth"]
    read_back = []
    files.save_step_checkpoint({"x": 2}, 0, verify=read_back.append)
    assert read_back == [files.step_checkpoint(0)] and files.in_step(0).paths() == []
    files.write_results({"miou": 0.5}, files.results(0))
    assert json.loads(files.results(0).read_text()) == {"miou": 0.5}
    files.close(failed=True)  # a finished step's files are kept
    assert files.step_checkpoint(0).is_file()
    torch.save({}, files.checkpoint_dir / "ignored.pth")
    files.step_checkpoint(0).unlink()
    files.results(0).unlink()
    files.close(failed=True)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_one_launch_per_run_and_stale_temporaries_removed(config):
    files, second = RunFiles(config), RunFiles(config)
    files.create_folders()
    stale = files.log_dir / ".step0.json.abc.tmp"
    stale.write_text("half")
    files.lock()
    assert not stale.exists()
    with pytest.raises(RunLockedError, match="another run is writing"):
        second.lock()
    files.close()
    second.lock()
    second.close()


def test_same_name_accepts_the_global_batch_on_another_process_count_and_names_the_file(config):
    # An earlier run of 2 processes x 4 images, as its step 1 results file stores it; this one has 1 process.
    files = RunFiles(config.replace(batch_size=8))
    files.create_folders()
    results = files.results(1)
    files.write_results({"options": dict(config.as_dict(), batch_size=4), "processes": 2}, results)
    files.check_same_name()  # 1 x 8 after 2 x 4
    with pytest.raises(UsageError) as refused:
        RunFiles(config.replace(batch_size=4)).check_same_name()  # 1 x 4 after 2 x 4
    message = str(refused.value)
    assert f"(stored in {results})" in message, message
    assert "global batch 8 (4 per process x 2 processes) -> 4 (4 per process x 1 process)" in message, message
    assert "pass --batch_size 8 to keep it on 1 process(es)" in message, message


def test_same_name_refused_or_overwritten(config):
    files = RunFiles(config)
    files.create_folders()
    stored = dict(config.as_dict(), weight_decay=0.5)
    files.write_results({"options": stored}, files.results(1))
    with pytest.raises(UsageError, match="--weight_decay 0.5 -> 0.0001"):
        files.check_same_name()
    overwriting = RunFiles(config.replace(overwrite=True))
    overwriting.check_same_name()
    overwriting.lock()
    assert not files.results(1).exists()
    assert "--overwrite: removed the files of step 1 and later" in overwriting.notes[0]
    overwriting.close()
