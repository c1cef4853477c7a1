import os

import pytest

from segmentation import tasks
from segmentation.engine import options
from segmentation.engine.options import build_parser, parse_options

from option_helpers import missing_file_error, option_workdir, usage_error  # noqa: F401 (option_workdir: a fixture)


pytestmark = pytest.mark.usefixtures("option_workdir")


def test_reference_defaults():
    opts = parse_options([])
    assert opts.dataset == "voc"
    assert opts.task == "19-1" and opts.steps == (0,) and not opts.overlap
    assert opts.method is None
    assert (opts.lr, opts.epochs, opts.batch_size, opts.crop_size) == (0.007, 30, 4, 512)
    assert (opts.backbone, opts.output_stride, opts.norm_act) == ("resnet101", 16, "iabn_sync")
    assert (opts.random_seed, opts.val_interval, opts.pooling) == (42, 1, 32)
    assert (opts.weight_decay, opts.momentum, opts.lr_policy, opts.lr_power) == (1e-4, 0.9, "poly", 0.9)
    assert (opts.lr_decay_step, opts.lr_decay_factor) == (5000, 0.1)
    assert (opts.methods.loss_kd, opts.methods.loss_de, opts.methods.alpha, opts.methods.icarl_importance) == (0.0, 0.0, 1.0, 1.0)
    assert not (opts.methods.unce or opts.methods.unkd or opts.methods.init_balanced or opts.methods.icarl or opts.freeze)
    assert opts.amp == "off" and not opts.channels_last and opts.device == "auto"
    assert opts.checkpoint_dir == "checkpoints" and opts.ckpt_interval == 500 and opts.resume
    assert not opts.test and not opts.eval_full_image and opts.visualize
    assert opts.pretrained == os.path.join("pretrained", "resnet101_iabn_sync.pth.tar")
    assert parse_options(["--dataset", "synthetic", "--data_root", "syn"]).pretrained is None  # from scratch
    assert opts.name == "Experiment" and opts.logdir == "logs" and opts.split_dir is None


@pytest.mark.parametrize("spelling", ["MiB", "MIB", "mib"])
def test_method_is_case_insensitive(spelling):
    opts = parse_options(["--method", spelling, "--task", "15-5", "--step", "1"])
    assert opts.method == "MiB"
    assert (opts.methods.loss_kd, opts.methods.unce, opts.methods.unkd, opts.methods.init_balanced) == (10.0, True, True, True)
    assert opts.notes == ("MiB preset filled in: loss_kd=10, unce=True, unkd=True, init_balanced=True",)


@pytest.mark.parametrize(
    "method, expected",
    [
        ("FT", {"loss_kd": 0.0, "loss_de": 0.0, "icarl": False, "unce": False}),
        ("LWF", {"loss_kd": 100.0, "loss_de": 0.0, "unkd": False}),
        ("lwf-mc", {"icarl": True, "icarl_importance": 10.0, "loss_kd": 0.0}),
        ("ILT", {"loss_kd": 100.0, "loss_de": 100.0}),
        ("EWC", {"regularizer": "ewc", "reg_importance": 500.0, "loss_kd": 0.0}),
        ("pi", {"regularizer": "pi", "reg_importance": 500.0}),
        ("Rw", {"regularizer": "rw", "reg_importance": 100.0, "reg_alpha": 0.9, "reg_iterations": 10}),
    ],
)
def test_presets(method, expected):
    opts = parse_options(["--method", method])
    for name, value in expected.items():
        assert opts.as_dict()[name] == value, name


@pytest.mark.parametrize("task, kd", [("15-5s", 100.0), ("15-1", 100.0), ("15-5", 10.0), ("19-1", 10.0)])
def test_mib_kd_weight_depends_on_task(task, kd):
    opts = parse_options(["--method", "MiB", "--task", task])
    assert opts.methods.loss_kd == kd
    # The deviation from the original code's preset is said in the log.
    assert ("the original code's preset was 10" in opts.notes[0]) == (kd == 100.0)


def test_explicit_options_override_the_preset():
    opts = parse_options(["--method", "MiB", "--loss_kd", "100", "--alpha", "0.5"])
    assert opts.methods.loss_kd == 100.0 and opts.methods.alpha == 0.5
    assert opts.methods.unce and opts.methods.unkd and opts.methods.init_balanced
    # An explicit value equal to the argparse default still wins over the preset.
    assert parse_options(["--method", "LWF", "--loss_kd", "0"]).methods.loss_kd == 0.0
    assert parse_options(["--method", "LWF-MC", "--icarl_importance", "1"]).methods.icarl_importance == 1.0


def test_regularizer_preset_yields_to_explicit_flags():
    opts = parse_options(["--method", "EWC", "--reg_importance", "100", "--reg_no_normalize"])
    assert (opts.methods.regularizer, opts.methods.reg_importance, opts.methods.reg_no_normalize) == ("ewc", 100.0, True)


@pytest.mark.parametrize(
    "argv, option",
    [(["--icarl_disjoint"], "--icarl_disjoint"),
     (["--icarl", "--icarl_bkg"], "--icarl_bkg"),
     (["--dtype", "float64", "--amp", "bf16"], "--dtype"),
     (["--reg_iterations", "0"], "--reg_iterations"),
     (["--reg_alpha", "1.5"], "--reg_alpha"),
     (["--reg_importance", "-1"], "--reg_importance"),
     (["--regularizer", "si"], "--regularizer")],
)
def test_invalid_method_options(argv, option, capsys):
    assert option in usage_error(argv)


def test_unknown_method(capsys):
    message = usage_error(["--method", "SDR"])
    assert "SDR" in message and "MiB" in message


def test_aliases():
    assert parse_options(["--overlapped"]).overlap
    assert parse_options(["--overlap"]).overlap
    assert parse_options(["--no-pretrained"]).no_pretrained
    assert parse_options(["--crop_val"]).eval_full_image
    assert parse_options(["--eval_full_image"]).eval_full_image
    assert not parse_options(["--no-visualize"]).visualize
    assert not parse_options(["--no_visualize"]).visualize
    assert parse_options(["--checkpoint", "ck/step"]).checkpoint_dir == "ck/step"  # PLOP's name
    assert not parse_options(["--no_resume"]).resume
    assert parse_options(["--local_rank", "3"]).steps == (0,)
    assert parse_options(["--local-rank=1"]).steps == (0,)


def test_no_visualize_disables_image_samples():
    assert parse_options(["--sample_num", "3"]).sample_num == 3
    assert parse_options(["--sample_num", "3", "--no-visualize"]).sample_num == 0


def test_steps():
    assert parse_options(["--task", "15-5s", "--step", "2"]).steps == (2,)
    assert parse_options(["--task", "15-5s", "--step", "0,1,3"]).steps == (0, 1, 3)
    assert parse_options(["--task", "15-5s", "--step", "all"]).steps == tuple(
        range(tasks.num_steps("voc", "15-5s")))
    assert parse_options(["--task", "15-5", "--step", "ALL"]).steps == (0, 1)


@pytest.mark.parametrize("step", ["2", "0,5", "x", "1,0", "1 0", "0 2"])
def test_invalid_steps(step, capsys):
    message = usage_error(["--task", "15-5", "--step", *step.split()])
    assert f"--step {step}" in message


def test_step_out_of_range_lists_valid_steps(capsys):
    assert "0..1" in usage_error(["--task", "15-5", "--step", "2"])


def test_unknown_task(capsys):
    message = usage_error(["--task", "16-4"])
    assert "16-4" in message and "15-5" in message


@pytest.mark.parametrize(
    "argv, amp",
    [([], "off"), (["--amp", "bf16"], "bf16"), (["--opt_level", "O0"], "off"),
     (["--opt_level", "O1"], "fp16"), (["--opt_level", "O3"], "fp16"),
     (["--opt_level", "O2", "--amp", "fp16"], "fp16")],
)
def test_amp(argv, amp):
    opts = parse_options(argv)
    assert opts.amp == amp
    assert "opt_level" not in opts.as_dict()


def test_amp_conflicting_with_opt_level(capsys):
    message = usage_error(["--opt_level", "O1", "--amp", "bf16"])
    assert "--amp bf16" in message and "--opt_level O1" in message


def test_pretrained_default_on_real_datasets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = missing_file_error(["--dataset", "voc", "--backbone", "resnet50"])
    assert "pretrained/resnet50_iabn_sync.pth.tar" in message.replace(os.sep, "/")
    assert "--pretrained torchvision" in message and "--no_pretrained" in message

    # Later steps and --test start from checkpoints, so they do not need the ImageNet file.
    assert parse_options(["--dataset", "voc", "--task", "15-5", "--step", "1"]).pretrained is None
    assert parse_options(["--dataset", "ade", "--task", "100-50", "--test"]).pretrained is None
    assert parse_options(["--dataset", "voc", "--no_pretrained"]).pretrained is None
    assert parse_options(["--dataset", "voc", "--pretrained", "torchvision"]).pretrained == "torchvision"

    default = tmp_path / "pretrained" / "resnet50_iabn_sync.pth.tar"
    default.write_bytes(b"weights")
    opts = parse_options(["--dataset", "voc", "--backbone", "resnet50"])
    assert opts.pretrained == os.path.join("pretrained", "resnet50_iabn_sync.pth.tar")


def test_pretrained_path(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    assert parse_options(["--pretrained", str(weights)]).pretrained == str(weights)
    assert "w2.pth" in missing_file_error(["--pretrained", str(tmp_path / "w2.pth")])
    message = usage_error(["--pretrained", str(weights), "--no_pretrained"])
    assert "--pretrained" in message and "--no_pretrained" in message


@pytest.mark.parametrize(
    "argv, option",
    [(["--lr", "0"], "--lr"), (["--epochs", "0"], "--epochs"), (["--ckpt_interval", "-1"], "--ckpt_interval"),
     (["--batch_size", "0"], "--batch_size"), (["--val_interval", "0"], "--val_interval"),
     (["--task", "15-5", "--step", "all", "--ckpt", "x.pth"], "--ckpt"),
     (["--task", "15-5", "--step", "0,1", "--step_ckpt", "x.pth"], "--step_ckpt"),
     (["--step_ckpt", "x.pth"], "--step_ckpt")],
)
def test_invalid_values(argv, option, capsys):
    assert option in usage_error(argv)


def test_old_reference_command_line(tmp_path):
    # A README-style command line (with its typos) is accepted.
    argv = ["--local_rank", "0", "--data_root", "data", "--batch_size", "12", "--dataset", "voc",
            "--name", "MIB", "--task", "15-5s", "--step", "1", "--lr", "0.001", "--epochs", "30",
            "--method", "MIB", "--overlapped", "--opt_level", "O1", "--crop_val"]
    opts = parse_options(argv)
    assert (opts.dataset, opts.task, opts.steps, opts.overlap) == ("voc", "15-5s", (1,), True)
    assert (opts.method, opts.methods.loss_kd, opts.amp, opts.eval_full_image) == ("MiB", 100.0, "fp16", True)
    assert (opts.batch_size, opts.lr, opts.name) == (12, 0.001, "MIB")


def test_help_is_grouped_and_shows_defaults():
    text = build_parser().format_help()
    for group in ("data:", "incremental task:", "method and losses:", "optimisation:", "model:",
                  "mixed precision and performance:", "checkpoints and resuming:", "evaluation:",
                  "logging:", "distributed:"):
        assert group in text
    assert "(default: 0.007)" in text and "(default: resnet101)" in text
    assert "--no_visualize" not in text


def test_every_option_the_engine_reads_is_present():
    opts = parse_options([])
    for name in ("data_root", "dataset", "task", "steps", "overlap", "method", "lr", "epochs", "batch_size",
                 "crop_size", "backbone", "output_stride", "norm_act", "pretrained", "loss_kd", "loss_de",
                 "unce", "unkd", "init_balanced", "alpha", "icarl", "icarl_importance", "freeze", "fix_bn",
                 "weight_decay", "momentum", "lr_policy", "lr_power", "lr_decay_step", "lr_decay_factor",
                 "name", "logdir", "checkpoint_dir", "step_ckpt", "ckpt", "test", "random_seed",
                 "num_workers", "val_interval", "amp", "channels_last", "ckpt_interval", "resume",
                 "eval_full_image", "pooling", "split_dir", "visualize", "sample_num", "device",
                 "print_interval", "bce", "icarl_disjoint", "icarl_bkg", "no_mask", "cross_val",
                 "val_on_trainset", "dtype", "regularizer", "reg_importance", "reg_alpha",
                 "reg_no_normalize", "reg_iterations", "label_protocol", "data_masking", "ignore_test_bg",
                 "test_on_val"):
        assert name in opts.as_dict(), name
    assert options.method_names() == ["FT", "PI", "EWC", "RW", "LWF", "LWF-MC", "ILT", "MiB", "PLOP"]


def test_incremental_lr_defaults_to_none_and_must_be_positive():
    assert parse_options([]).incremental_lr is None
    assert parse_options(["--incremental_lr", "0.001"]).incremental_lr == 0.001
    assert "--incremental_lr must be positive" in usage_error(["--incremental_lr", "0"])


def test_steps_and_learning_rates_per_step_as_in_plop():
    opts = parse_options(["--task", "15-5s", "--step", "0", "1", "2", "--lr", "0.01", "0.001", "0.001"])
    assert opts.steps == (0, 1, 2) and (opts.lr, opts.incremental_lr) == (0.01, 0.001)
    opts = parse_options(["--task", "15-5s", "--step", "2", "3", "--lr", "0.001", "0.001"])
    assert opts.steps == (2, 3) and opts.incremental_lr == 0.001
    single = parse_options(["--task", "15-5", "--step", "1", "--lr", "0.001"])
    assert (single.lr, single.incremental_lr) == (0.001, None)


@pytest.mark.parametrize("argv, words", [
    (["--step", "0", "1", "--lr", "0.01"], None),  # one value: every step
    (["--step", "0", "1", "--lr", "0.01", "0.001", "0.1"], "one per step"),
    (["--task", "15-5s", "--step", "1", "2", "--lr", "0.001", "0.002"], "share one learning rate"),
    (["--step", "0", "1", "--lr", "0.01", "0.001", "--incremental_lr", "0.001"], "drop --incremental_lr"),
])
def test_learning_rates_per_step_errors(argv, words, capsys):
    argv = ["--task", "15-5", *argv] if "--task" not in argv else argv
    if words is None:
        assert parse_options(argv).lr == 0.01
    else:
        assert words in usage_error(argv)


@pytest.mark.parametrize("argv, option", [
    (["--random_seed", "-1"], "--random_seed"), (["--momentum", "2.7"], "--momentum"),
    (["--crop_size", "7"], "--crop_size"), (["--crop_size", "24", "--output_stride", "16"], "--output_stride 16"),
    (["--lr_power", "0"], "--lr_power"),
])
def test_ranges(argv, option, capsys):
    assert option in usage_error(argv)
    assert parse_options(["--crop_size", "16", "--output_stride", "8"]).crop_size == 16


def test_visualize_is_refused_with_its_original_meaning(capsys):
    message = usage_error(["--visualize"])
    assert "turned TensorBoard off" in message and "--no-visualize" in message


def test_plop_harmless_options_are_noted(capsys):
    opts = parse_options(["--date", "2021-01-01", "--code_directory", ".", "--fusion-mode", "mean",
                          "--pod_apply", "all", "--step_threshold", "0.1", "--dont_predict_bg",
                          "--pod_interpolate_last", "--entropy_min_mean_pixels", "--strict_weights",
                          "--base_weights"])
    assert [note.split(":")[0] for note in opts.notes] == [
        "--date 2021-01-01", "--code_directory .", "--fusion-mode mean", "--pod_apply all", "--step_threshold 0.1",
        "--dont_predict_bg", "--pod_interpolate_last", "--entropy_min_mean_pixels", "--strict_weights",
        "--base_weights"]
    assert all("changes nothing here" in note and note.endswith("; ignored") for note in opts.notes)
    assert "the original does not use it either" in opts.notes[3]
    assert "only the new head may be missing" in opts.notes[8]
    assert not any(name.startswith("ignored_") for name in opts.as_dict())
    # Nothing of them reaches the configuration: the same options without them.
    assert opts.replace(notes=()) == parse_options([]).replace(notes=())


def test_base_weights_is_refused_after_step_0(capsys):
    message = usage_error(["--task", "15-5", "--step", "0", "1", "--base_weights"])
    assert "--base_weights" in message and "[1]" in message


@pytest.mark.parametrize("argv, named", [
    (["--cosine"], "--cosine"),
    (["--cosine", "--lr_old", "0.1", "--temperature=2", "--cosine"], "--cosine, --lr_old, --temperature"),
    (["--pseudo_soft", "soft_certain", "--ce_on_new", "--disable_background"],
     "--pseudo_soft, --ce_on_new, --disable_background"),
])
def test_plop_experimental_options_are_refused_in_one_line(argv, named, capsys):
    message = usage_error(argv)
    assert message.startswith("PLOP's experimental options") and "not implemented here: " + named + ";" in message


def test_plop_experimental_options_are_not_options_of_the_parser():
    # Refused by name before parsing; none of them may also be an option (or an ignored one).
    flags = {flag for action in build_parser()._actions for flag in action.option_strings}
    assert not set(options.PLOP_EXPERIMENTAL_OPTIONS) & flags
    assert not set(options.PLOP_EXPERIMENTAL_OPTIONS) & (set(options.PLOP_IGNORED_OPTIONS) | set(options.PLOP_IGNORED_FLAGS))


def test_label_option_values_match_the_data_protocol():
    from segmentation.data.protocol import DATA_MASKINGS, LABEL_PROTOCOLS

    assert options.LABEL_PROTOCOLS == LABEL_PROTOCOLS
    assert options.DATA_MASKINGS == DATA_MASKINGS + ("all",)  # "all" is refused with its own message


def test_label_protocol_is_mib_by_default_and_can_be_given():
    opts = parse_options([])
    assert (opts.label_protocol, opts.data_masking, opts.ignore_test_bg, opts.test_on_val) == (
        "mib", "current", False, False)
    assert opts.notes == ()
    opts = parse_options(["--label_protocol", "plop"])
    assert opts.label_protocol == "plop" and opts.notes == ()


# These need PLOP's method options (segmentation/methods/plop.py, registered).
@pytest.mark.parametrize("argv, why", [
    (["--pod", "local"], "--pod local"),
    (["--pseudo", "entropy"], "--pseudo entropy"),
    (["--method", "PLOP", "--task", "15-1"], "--pod local and --pseudo entropy"),  # from the preset
])
def test_plop_options_choose_the_plop_label_protocol(argv, why):
    opts = parse_options(argv)
    assert opts.label_protocol == "plop"
    assert f"--label_protocol plop (PLOP's label mapping) chosen with {why}; pass --label_protocol mib" in opts.notes[-1]
    # Given explicitly, the protocol wins, and nothing is noted.
    opts = parse_options([*argv, "--label_protocol", "mib"])
    assert opts.label_protocol == "mib" and not any("--label_protocol" in note for note in opts.notes)


def test_data_masking(capsys):
    assert "NotImplementedError" in usage_error(["--data_masking", "all"])
    assert parse_options(["--label_protocol", "plop", "--data_masking", "new"]).data_masking == "new"
    message = usage_error(["--data_masking", "current+old"])
    assert "--data_masking current+old" in message and "--label_protocol plop" in message
    message = usage_error(["--label_protocol", "plop", "--data_masking", "new", "--no_mask"])
    assert "--data_masking new" in message and "--no_mask" in message
    assert parse_options(["--label_protocol", "plop", "--data_masking", "current+old", "--no_mask"]).no_mask
    # ADE ignores it, as the original: noted, and the configuration holds what is used.
    opts = parse_options(["--dataset", "ade", "--task", "100-50", "--data_masking", "new"])
    assert opts.data_masking == "current"
    assert opts.notes == ("--data_masking new: PLOP's masking of VOC labels; ignored on ade, as in the original",)


def test_ignore_test_bg_and_test_on_val_where_they_apply(capsys):
    assert parse_options(["--dataset", "ade", "--task", "100-50", "--ignore_test_bg"]).ignore_test_bg
    assert parse_options(["--test_on_val"]).test_on_val
    assert parse_options(["--dataset", "synthetic", "--data_root", "syn", "--test_on_val"]).test_on_val
    for dataset in ("voc", "synthetic"):
        message = usage_error(["--dataset", dataset, "--data_root", "syn", "--ignore_test_bg"])
        assert "--ignore_test_bg" in message and f"--dataset {dataset}" in message
    message = usage_error(["--dataset", "ade", "--task", "100-50", "--test_on_val"])
    assert "--test_on_val" in message and "--dataset ade" in message


@pytest.mark.parametrize("task", ["50", "50b", "50-50"])
def test_ade_balanced_splits_need_the_original_files(task, tmp_path, capsys):
    argv = ["--dataset", "ade", "--task", task, "--step", "1"]
    message = missing_file_error(argv)
    assert "--split_dir" in message and "--allow_regenerated_splits" in message and "fcdl94/MiB" in message
    assert parse_options([*argv, "--allow_regenerated_splits"]).task == task
    assert parse_options([*argv, "--split_dir", str(tmp_path)]).split_dir == str(tmp_path)
    assert parse_options([*argv, "--overlap"]).overlap  # overlapped splits are always computed
    assert parse_options(["--dataset", "ade", "--task", "100-50", "--step", "1"]).task == "100-50"


def test_missing_dataset_points_to_synthetic(tmp_path, capsys):
    message = missing_file_error(["--data_root", str(tmp_path / "nowhere")])
    assert "PascalVOC12" in message and "--dataset synthetic" in message


def test_synthetic_data_is_not_written_next_to_a_real_dataset(tmp_path, capsys):
    message = usage_error(["--dataset", "synthetic"])  # ./data holds PascalVOC12/
    assert "--data_root" in message and "--allow_synthetic_in_data_root" in message
    assert parse_options(["--dataset", "synthetic", "--allow_synthetic_in_data_root"]).dataset == "synthetic"
    assert parse_options(["--dataset", "synthetic", "--data_root", str(tmp_path / "syn")]).dataset == "synthetic"


def test_debug_flag_and_environment(monkeypatch):
    assert options.debug_requested(["--debug"]) and not options.debug_requested([])
    monkeypatch.setenv(options.DEBUG_ENV, "1")
    assert options.debug_requested([])
