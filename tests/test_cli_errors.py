"""Mistakes on the command line, run through ``train.py``'s entry function as a user would.

Each case checks the exit code (2: usage, 1: the rest), that the error is one paragraph (one
"train.py: error:" line, the last one, naming the option or file at fault, no traceback), that it
came before any training iteration, that the files of an earlier good run are unchanged and
that the failed run left no folder behind. The cases run in this process; a few run as a
``train.py`` process too, for the exit code the shell sees.
"""
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from segmentation.distributed import CollectiveError
from segmentation.engine import run
from segmentation.engine.checkpoint import CheckpointError
from segmentation.engine.loader_watch import DataLoaderFailure
from segmentation.engine.options import HELP_POINTER
from segmentation.engine.run_lock import RunLock, RunLockedError
from segmentation.engine.trainer import NonFiniteLossError, TrainingInterrupted
from segmentation.errors import EXIT_FAILURE, EXIT_USAGE, RunError, SetupError, UsageError
from segmentation.files import WriteError
from train_cli_worker import run_train, run_train_in_process, train_args

SETTING = "synthetic-15-5"


@pytest.fixture(scope="module")
def good_run(data_root, tmp_path_factory):
    """A finished step 0 under --name good; the failing runs share its folders."""
    out = tmp_path_factory.mktemp("good")
    run_train_in_process(train_args(data_root, out, "--step", "0", name="good"))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, good_run):
    """Bad inputs: a text file, a file where a folder should be, original-code checkpoints."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "text.pth").write_text("not a checkpoint\n")
    (folder / "a_file").write_text("")
    state = torch.load(good_run / "checkpoints" / SETTING / "good" / "step0.pth", weights_only=False)["model_state"]
    original = {"module." + key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    torch.save({"epoch": 1, "model_state": original, "optimizer_state": {}}, folder / "original-step0.pth")
    wider = dict(original, **{"module.cls.1.weight": torch.zeros(3, 256, 1, 1), "module.cls.1.bias": torch.zeros(3)})
    torch.save({"epoch": 1, "model_state": wider}, folder / "original-two-heads.pth")
    return folder


def _checksums(folder: Path) -> dict:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.rglob("*") if path.is_file()}


def _data_copy(data_root: str, tmp_path: Path) -> Path:
    """A copy of the synthetic data without cached splits (so the split scan reads every file)."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    for cache in root.rglob("incremental-splits"):
        shutil.rmtree(cache)
    return root


def _first_train_files(root: Path):
    image, label = (root / "SyntheticVOC" / "splits" / "train_aug.txt").read_text().split("\n")[0].split()
    return root / "SyntheticVOC" / image.lstrip("/"), root / "SyntheticVOC" / label.lstrip("/")


def _assert_refused(result, code: int, *culprits: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("train.py: error: "), output
    assert sum(line.startswith("train.py: error") for line in lines) == 1, output
    for culprit in culprits:
        assert culprit in lines[-1], lines[-1]
    if code == 2:
        assert lines[-1].endswith(HELP_POINTER), lines[-1]
    # Before any training iteration: no iteration count logged, no progress line.
    assert "iterations per epoch" not in output and " loss=" not in output
    return lines[-1]


def _run_bad(data_root, out, *extra, name="bad", data=None, in_process=True):
    args = train_args(str(data or data_root), out, *extra, name=name)
    return run_train_in_process(args, check=False) if in_process else run_train(args, check=False)


PARSE_ERRORS = [
    (["--dataset", "cityscapes"], "--dataset"),
    (["--task", "16-4"], "16-4"),
    (["--method", "SDR"], "SDR"),
    (["--step", "5"], "--step 5"),
    (["--random_seed", "-1"], "--random_seed"),
    (["--crop_size", "7"], "--crop_size"),
    (["--momentum", "2.7"], "--momentum"),
    (["--visualize"], "--visualize"),
    (["--cosine", "--lr_old", "0.1"], "not implemented here: --cosine, --lr_old"),
    (["--data_masking", "all"], "--data_masking all"),
    (["--ignore_test_bg"], "--ignore_test_bg"),
    (["--step", "1", "--base_weights"], "--base_weights"),
    (["--lr", "0.01", "0.001"], "--lr"),
    # No abbreviations: a typo must not set another option.
    (["--epoch", "3"], "unrecognized arguments: --epoch"),
    (["--batch", "4"], "unrecognized arguments: --batch"),
]


@pytest.mark.parametrize("extra, culprit", PARSE_ERRORS, ids=[case[1] for case in PARSE_ERRORS])
def test_usage_errors_found_while_parsing(data_root, good_run, extra, culprit):
    before = _checksums(good_run)
    _assert_refused(_run_bad(data_root, good_run, *extra), 2, culprit)
    assert _checksums(good_run) == before
    assert not (good_run / "checkpoints" / SETTING / "bad").exists()


MISSING_WHILE_PARSING = [
    (["--pretrained", "/nonexistent/w.pth"], "--pretrained /nonexistent/w.pth: file not found"),
    (["--step", "1", "--step_ckpt", "/nonexistent/step0.pth"], "--step_ckpt /nonexistent/step0.pth"),
    (["--dataset", "voc"], "no dataset at"),
]


@pytest.mark.parametrize("extra, culprit", MISSING_WHILE_PARSING, ids=[case[1] for case in MISSING_WHILE_PARSING])
def test_missing_files_named_by_the_options_exit_with_1(data_root, good_run, extra, culprit):
    # The README: exit code 2 means a wrong option, 1 a missing file (found while parsing or later).
    line = _assert_refused(_run_bad(data_root, good_run, *extra), 1, culprit)
    assert not line.endswith(HELP_POINTER)
    assert not (good_run / "checkpoints" / SETTING / "bad").exists()


CHECKED_BEFORE_TRAINING = [
    # (extra options, exit code, words the message must hold)
    (["--batch_size", "1"], 2, ["--batch_size"]),
    (["--backbone", "resnet19"], 2, ["--backbone resnet19", "resnet18"]),
    (["--step", "1"], 1, ["step0.pth", "train step 0 first", "--step all", "--step_ckpt"]),
    (["--step", "1", "--step_ckpt", "{inputs}/text.pth"], 1, ["--step_ckpt", "text.pth", "not a checkpoint"]),
    (["--step", "1", "--step_ckpt", "{inputs}/original-two-heads.pth"], 1,
     ["--step_ckpt", "original MiB/PLOP", "[16, 3]", "[16]"]),
    (["--step", "1", "--test", "--ckpt", "{inputs}/original-step0.pth"], 1, ["--ckpt", "[16]", "[16, 5]"]),
    (["--pretrained", "{inputs}/text.pth"], 1, ["--pretrained", "text.pth"]),
    (["--checkpoint_dir", "{inputs}/a_file"], 1, ["--checkpoint_dir", "a_file"]),
    (["--logdir", "{inputs}/a_file/logs"], 1, ["--logdir", "a_file"]),
    (["--step", "1", "--test"], 1, ["--test", "step1.pth", "does not exist"]),
]


@pytest.mark.parametrize("extra, code, words", CHECKED_BEFORE_TRAINING,
                         ids=[" ".join(case[0][-2:]) for case in CHECKED_BEFORE_TRAINING])
def test_errors_found_before_training(data_root, good_run, files, extra, code, words):
    # A later --checkpoint_dir/--logdir replaces the one train_args gives.
    extra = [value.replace("{inputs}", str(files)) for value in extra]
    before = _checksums(good_run)
    _assert_refused(_run_bad(data_root, good_run, *extra), code, *words)
    assert _checksums(good_run) == before
    assert not (good_run / "checkpoints" / SETTING / "bad").exists()
    assert not (good_run / "logs" / SETTING / "bad").exists()


@pytest.mark.parametrize("extra, code, culprit", [
    (["--task", "16-4"], 2, "16-4"),  # argparse's exit
    (["--step", "1", "--test"], 1, "step1.pth"),  # train.py's return code
])
def test_exit_code_of_the_process(data_root, good_run, extra, code, culprit):
    _assert_refused(_run_bad(data_root, good_run, *extra, in_process=False), code, culprit)


@pytest.mark.distributed
def test_torchrun_reports_an_error_once(data_root, tmp_path):
    # Every process meets the error alike: only rank 0 reports it. (torchrun then adds its own
    # report of the failed processes.)
    with RunLock(tmp_path / "checkpoints" / SETTING / "run"):  # as a running launch holds it
        result = run_train(train_args(data_root, tmp_path, "--step", "0"), nproc=2, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("train.py: error") == 1 and "another run is writing to" in output, output


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_only_rank_0_reports_an_option_error(data_root, tmp_path, monkeypatch, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_train_in_process(train_args(data_root, tmp_path, "--task", "16-4"), check=False)
    assert result.returncode == 2
    assert ("train.py: error: " in result.stderr) == printed, result.stderr


def test_same_name_with_other_options_is_refused(data_root, good_run):
    before = _checksums(good_run)
    args = train_args(data_root, good_run, "--step", "0", "--weight_decay", "0.001", name="good")
    args[args.index("--lr") + 1] = "0.02"
    message = _assert_refused(run_train_in_process(args, check=False), 2, "--name good", "--weight_decay",
                              "learning rate of step 0 0.01 -> 0.02", "another --name", "--overwrite")
    assert "--num_workers" not in message
    assert _checksums(good_run) == before
    # Options that do not change the result may differ: the finished step is skipped.
    result = run_train_in_process(train_args(data_root, good_run, "--step", "0", "--print_interval", "5", name="good"))
    assert "step 0 already finished" in result.stdout
    run_log = good_run / "logs" / SETTING / "good" / "train.log"
    assert "step 0 already finished" in run_log.read_text()  # that launch's lines were added
    after = _checksums(good_run)
    assert {path: digest for path, digest in after.items() if path != run_log} == {
        path: digest for path, digest in before.items() if path != run_log}


def test_overwrite_replaces_the_earlier_run(data_root, good_run, tmp_path):
    shutil.copytree(good_run, tmp_path / "out")
    out = tmp_path / "out"
    args = train_args(data_root, out, "--step", "0", "--weight_decay", "0.001", "--overwrite", name="good")
    result = run_train_in_process(args)
    assert "--overwrite: removed the files of step 0" in result.stdout
    saved = torch.load(out / "checkpoints" / SETTING / "good" / "step0.pth", weights_only=False)
    assert saved["options"]["weight_decay"] == 0.001


@pytest.mark.parametrize("damage, culprit", [("label", ".png"), ("image", ".jpg")])
def test_bad_data_files_are_named(data_root, good_run, tmp_path, damage, culprit):
    root = _data_copy(data_root, tmp_path)
    image, label = _first_train_files(root)
    if damage == "label":
        with Image.open(label) as opened:
            broken = opened.copy()
        broken.putpixel((0, 0), 50)  # not a VOC class
        broken.save(label)
    else:
        image.write_bytes(b"\xff\xd8 truncated")
    before = _checksums(good_run)
    message = _assert_refused(_run_bad(data_root, good_run, data=root), 1, culprit)
    assert (label.name if damage == "label" else image.name) in message
    assert _checksums(good_run) == before
    assert not (good_run / "checkpoints" / SETTING / "bad").exists()
    assert not (good_run / "logs" / SETTING / "bad").exists()


def test_real_dataset_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = train_args(str(empty), tmp_path, "--step", "0")
    args[args.index("--dataset") + 1] = "voc"
    _assert_refused(run_train_in_process(args, check=False), 1, "PascalVOC12", "--dataset synthetic")
    (empty / "PascalVOC12").mkdir()
    args[args.index("--dataset") + 1] = "synthetic"
    _assert_refused(run_train_in_process(args, check=False), 2, "--allow_synthetic_in_data_root")
    assert not (empty / "SyntheticVOC").exists()
    (empty / "ADEChallengeData2016").mkdir()
    args = train_args(str(empty), tmp_path, "--step", "1", "--no_pretrained", task="50")
    args[args.index("--dataset") + 1] = "ade"
    _assert_refused(run_train_in_process(args, check=False), 1, "--split_dir", "--allow_regenerated_splits")


def test_debug_shows_the_traceback(data_root, tmp_path):
    result = run_train(train_args(data_root, tmp_path, "--backbone", "resnet19", "--debug"), check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr and "resnet19" in result.stderr


def test_original_checkpoint_continues_as_step_ckpt(data_root, good_run, files, tmp_path):
    args = train_args(data_root, tmp_path, "--step", "1", "--method", "MiB",
                      "--step_ckpt", str(files / "original-step0.pth"))
    result = run_train_in_process(args)
    assert "a checkpoint of the original MiB/PLOP code, converted" in result.stdout
    step1 = torch.load(tmp_path / "checkpoints" / SETTING / "run" / "step1.pth", weights_only=False)
    assert step1["classes"] == [16, 5]


@pytest.mark.parametrize("error, code, hint", [
    (CheckpointError("cannot read checkpoint x.pth; delete it"), 1, False),
    (RunLockedError("another run is writing"), 1, False),
    (NonFiniteLossError(1, 7, ["loss_kd"], None), 1, False),
    (TrainingInterrupted(1, 7), 3, False),
    (ValueError("a defect"), 1, True),  # not a RunError: the type and the --debug hint
])
def test_train_py_exits_with_the_code_the_error_carries(data_root, tmp_path, monkeypatch, error, code, hint):
    def failing(config):
        raise error

    monkeypatch.setattr(run, "main", failing)
    result = run_train_in_process(train_args(data_root, tmp_path, "--step", "0"), check=False)
    assert result.returncode == code == getattr(error, "exit_code", EXIT_FAILURE)
    assert str(error) in result.stderr and "Traceback" not in result.stderr
    assert ("rerun with --debug for the traceback" in result.stderr) == hint


def test_every_error_a_user_meets_carries_the_readme_exit_code():
    # The README: 2 means a wrong option, 1 anything else, 3 a stop after a signal.
    assert (UsageError.exit_code, SetupError.exit_code, TrainingInterrupted.exit_code) == (EXIT_USAGE, 1, 3)
    for failure in (CheckpointError, RunLockedError, WriteError, NonFiniteLossError, CollectiveError, DataLoaderFailure):
        assert issubclass(failure, RunError) and failure.exit_code == EXIT_FAILURE == 1, failure
