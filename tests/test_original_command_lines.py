"""The command lines of the original MiB README and of PLOP's scripts: each parses to the
original's configuration, and every line of PLOP's scripts runs.

``original-command-lines.json`` (from the project's reference material, copied to
tests/data/) holds each line, whether the original accepted it and the loss settings it
produced. A line the original accepted must parse to the same loss settings. The lines of PLOP's
scripts then train (or test) on small synthetic stand-ins of VOC and ADE20K, step after step as the
script runs them, with a tiny model: only the data root and the model's size change. Steps 0 to 2
run; a later step's line repeats step 2's with another ``--step`` (checked), so it is parsed only.
"""
import json
import os
import shlex
from collections import defaultdict

import pytest

from conftest import build_once
from option_helpers import option_workdir, usage_error  # noqa: F401 (option_workdir: a fixture)
from segmentation.engine.options import parse_options
from train_cli_worker import run_train_in_process

LINES = json.loads(open(os.path.join(os.path.dirname(__file__), "data", "original-command-lines.json")).read())
IMPLEMENTED_LOSS_SETTINGS = {"loss_kd": 0.0, "loss_de": 0.0, "icarl": False, "icarl_importance": 1.0,
                             "alpha": 1.0, "unce": False, "unkd": False, "init_balanced": False,
                             "reg_importance": 1.0, "pod": None, "pod_factor": 5.0, "pod_logits": False,
                             "pod_options": None, "pseudo": None, "threshold": 0.9,
                             "classif_adaptive_factor": False}
FIRST_MODEL = "(FIRSTMODEL variant)"


def _argv(line):
    """The line's arguments, with our data folder and local stand-ins for its checkpoint files."""
    argv = shlex.split(line["argv"])
    argv[argv.index("--data_root") + 1] = "data"
    for flag in ("--ckpt", "--step_ckpt"):
        if flag in argv:
            stand_in = os.path.basename(argv[argv.index(flag) + 1])
            open(stand_in, "wb").close()
            argv[argv.index(flag) + 1] = stand_in
    return argv


def _value(argv, *flags):
    for flag in flags:
        if flag in argv:
            return argv[argv.index(flag) + 1]
    return None


def _id(index_line):
    index, line = index_line
    return f"{index}-{line['source'].split()[-1]}"


def _loss_settings(config):
    settings = {name: config.as_dict()[name] for name in IMPLEMENTED_LOSS_SETTINGS}
    if settings["pod_options"] is not None:
        settings["pod_options"] = json.loads(settings["pod_options"])
    return settings


@pytest.mark.usefixtures("option_workdir")
@pytest.mark.parametrize("line", LINES, ids=[_id(pair) for pair in enumerate(LINES)])
def test_original_command_line(line):
    argv = _argv(line)
    if not line["accepted_by_the_original"]:
        if "--no-pretrained" in argv:  # the README's spelling, accepted here
            assert parse_options(argv).no_pretrained
        elif "--pod" in argv:  # PLOP's README line: the original refused only its --overlapped spelling
            opts = parse_options(argv)
            assert opts.method == "FT" and opts.overlap and opts.label_protocol == "plop"
            assert _loss_settings(opts) == _loss_settings(parse_options([*argv, "--method", "PLOP"]))
        elif _value(argv, "--method") == "RW":  # the original refused only its --overlapped spelling
            opts = parse_options(argv)
            assert (opts.method, opts.methods.regularizer, opts.methods.reg_importance) == ("RW", "rw", 100.0)
        else:  # --task 100-50 --step 2 (no such step)
            assert "--step 2" in usage_error(argv)
        return

    opts = parse_options(argv)
    step = int(_value(argv, "--step") or 0)
    assert opts.steps == (step,)
    assert opts.dataset == (_value(argv, "--dataset") or "voc")
    assert opts.task == (_value(argv, "--task") or "19-1")
    assert opts.name == _value(argv, "--name")
    assert opts.overlap == ("--overlap" in argv or "--overlapped" in argv)
    assert opts.test == ("--test" in argv)
    assert opts.ckpt == _value(argv, "--ckpt") and opts.step_ckpt == _value(argv, "--step_ckpt")
    for option in ("batch_size", "epochs"):
        if _value(argv, f"--{option}"):
            assert opts.as_dict()[option] == int(_value(argv, f"--{option}"))
    if _value(argv, "--lr"):
        assert opts.lr == float(_value(argv, "--lr")) and opts.incremental_lr is None
    assert opts.amp == ("fp16" if _value(argv, "--opt_level") == "O1" else "off")
    if _value(argv, "--checkpoint"):
        assert opts.checkpoint_dir == _value(argv, "--checkpoint")
    if "--date" in argv:
        assert any(note.startswith("--date") and "ignored" in note for note in opts.notes)
    assert opts.label_protocol == ("plop" if opts.methods.pod or opts.methods.pseudo else "mib")

    expected = {**IMPLEMENTED_LOSS_SETTINGS, **line["loss_settings_in_the_original"]}
    expected = {name: expected[name] for name in IMPLEMENTED_LOSS_SETTINGS}
    if opts.method == "MiB" and opts.task == "15-5s":
        # Documented deviation: the paper's 15-1 weight (100), said in the log; --loss_kd 10
        # gives the original code's value.
        assert opts.methods.loss_kd == 100.0 and "the original code's preset was 10" in opts.notes[0]
        opts = parse_options([*argv, "--loss_kd", str(expected["loss_kd"])])
    assert _loss_settings(opts) == expected


def test_the_sample_covers_both_sources():
    sources = {line["source"].split()[0] for line in LINES}
    assert sources == {"MiB", "PLOP"}
    assert sum(line["accepted_by_the_original"] for line in LINES) >= 50


# ---------------------------------------------------------------- PLOP's scripts run
def _scripts():
    """PLOP's script lines by script, in the order the script runs them (FIRSTMODEL variants last)."""
    scripts = defaultdict(list)
    for line in LINES:
        if line["source"].startswith("PLOP ") and line["accepted_by_the_original"]:
            scripts[line["source"].split()[1]].append(line)
    return {name: sorted(lines, key=lambda line: (FIRST_MODEL in line["source"],
                                                  int(_value(shlex.split(line["argv"]), "--step"))))
            for name, lines in scripts.items()}


SCRIPTS = _scripts()
# What changes: a tiny model, one epoch of 2-image batches on 32 px crops (so Local POD's grid is
# 2x2 at most: its maps are 2 pixels wide at stride 16), no ImageNet weights, and float32 instead of
# --opt_level O1 (fp16 autocast is three times slower on a CPU; the lines' O1 is checked above).
SMALL = ["--backbone", "resnet18", "--crop_size", "32", "--spp_scales", "1", "2", "--batch_size", "2",
         "--epochs", "1", "--no_pretrained", "--num_workers", "0", "--device", "cpu", "--no-visualize",
         "--print_interval", "50"]


@pytest.fixture(scope="session")
def script_data_root(tmp_path_factory):
    """Small VOC and ADE20K trees in which every step of every task has at least two images:
    VOC, two images of classes {c, c+5, c+10, c+15} for c = 1..5; ADE20K, one image of classes
    {c, c+25, ..., c+125} for c = 1..25. Validation and test use the training images."""
    from segmentation.data.synthetic import item_with_labels, write_ade_layout, write_voc_layout

    def build(folder):
        voc = [item_with_labels([0, c, c + 5, c + 10, c + 15], height=16, width=16, seed=seed * 10 + c)
               for seed in (0, 1) for c in range(1, 6)]
        write_voc_layout(str(folder / "PascalVOC12"), voc, voc)
        ade = [item_with_labels([0, *range(c, 151, 25)], height=16, width=16, seed=c) for c in range(1, 26)]
        write_ade_layout(str(folder / "ADEChallengeData2016"), ade, ade)

    return str(build_once(tmp_path_factory, "script-data", build))


def _runnable(line, data_root, first_model):
    argv = shlex.split(line["argv"])
    argv[argv.index("--data_root") + 1] = data_root
    level = argv.index("--opt_level")
    del argv[level:level + 2]
    for flag in ("--ckpt", "--step_ckpt"):
        if flag in argv:
            argv[argv.index(flag) + 1] = first_model
    if FIRST_MODEL in line["source"]:  # a run of its own beside the script's
        argv[argv.index("--name") + 1] += "-first"
    return [*argv, *SMALL]


def _without_step(argv):
    index = argv.index("--step")
    return argv[:index] + argv[index + 2:]


# Steps after this one repeat its line with another --step (checked): running them would train the
# same code again, so they are parsed only. Steps 0 to 2 run: the first step, the first
# incremental step and one that starts from an incremental step.
LAST_STEP_RUN = 2


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_plops_scripts_run_to_step_2_and_their_later_lines_repeat_step_2(script, script_data_root, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # the scripts' checkpoint and log folders are relative
    lines = SCRIPTS[script]
    first = shlex.split(lines[0]["argv"])
    first_model = str(tmp_path / _value(first, "--checkpoint") / f"{_value(first, '--dataset')}-"
                      f"{_value(first, '--task')}-ov" / _value(first, "--name") / "step0.pth")
    last_run = None
    for line in lines:
        argv = _runnable(line, script_data_root, first_model)
        step = int(_value(argv, "--step"))
        if step > LAST_STEP_RUN:
            assert _without_step(argv) == _without_step(last_run), line["argv"]
            assert parse_options(argv).steps == (step,)
            continue
        result = run_train_in_process(argv, check=False)
        assert result.returncode == 0, f"{line['argv']}\n{result.stdout}\n{result.stderr}"
        results = "eval-step" if "--test" in argv else "step"
        setting = f"{_value(argv, '--dataset')}-{_value(argv, '--task')}-ov"
        assert (tmp_path / "logs" / setting / _value(argv, "--name") / f"{results}{step}.json"
                ).exists(), line["argv"]
        if step == LAST_STEP_RUN:
            last_run = argv
