"""The typed configuration: built once from the command line, read-only, stored as the flat options."""
import dataclasses
import json

import pytest

from option_helpers import synthetic_config
from segmentation.config import Config, MethodOptions
from segmentation.engine.options import build_parser


def test_the_configuration_is_read_only():
    config = synthetic_config("--method", "MiB", "--step", "all")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.methods.loss_kd = 100.0
    assert config.steps == (0, 1) and isinstance(config.notes, tuple)
    assert isinstance(config.methods.estimate_importance, tuple)  # an nargs="+" option


def test_engine_options_are_fields_and_every_other_option_a_method_option():
    config = synthetic_config()
    fields = {item.name for item in dataclasses.fields(Config)} - {"methods", "notes"}
    # Every option the command line has is either a field or a method option, never both.
    parsed = set(vars(build_parser().parse_args([]))) - {"step", "opt_level", "visualize_flag"}
    parsed = {name for name in parsed if not name.startswith("ignored_")} | {"steps"}
    assert parsed == fields | set(config.methods)
    assert not fields & set(config.methods)
    assert {"loss_kd", "unce", "regularizer", "icarl"} <= set(config.methods)
    with pytest.raises(AttributeError, match="no method option 'loss_kdd'"):
        config.methods.loss_kdd


def test_as_dict_is_the_flat_mapping_that_checkpoints_store():
    config = synthetic_config("--method", "EWC", "--step", "0", "1", "--lr", "0.01", "0.001",
                              "--estimate_importance", "pi", "rw")
    stored = config.as_dict()
    assert stored["steps"] == [0, 1] and stored["estimate_importance"] == ["pi", "rw"]
    assert (stored["lr"], stored["incremental_lr"], stored["regularizer"]) == (0.01, 0.001, "ewc")
    assert stored["notes"] == list(config.notes) and "methods" not in stored
    json.dumps(stored)  # results files hold it as JSON
    assert Config.from_values(stored, stored.pop("notes")) == config


def test_replace_changes_engine_and_method_options_and_refuses_unknown_ones():
    config = synthetic_config()
    changed = config.replace(batch_size=8, loss_kd=5.0)
    assert (changed.batch_size, changed.methods.loss_kd) == (8, 5.0)
    assert (config.batch_size, config.methods.loss_kd) == (4, 0.0)
    with pytest.raises(ValueError, match="unknown options: batch"):
        config.replace(batch=8)
    with pytest.raises(ValueError, match="options missing from the configuration: batch_size"):
        Config.from_values({name: value for name, value in config.as_dict().items() if name != "batch_size"})


def test_method_options_compare_by_value():
    assert MethodOptions({"a": [1]}) == MethodOptions({"a": (1,)})
    assert MethodOptions({"a": 1}) != MethodOptions({"a": 2})
    assert dict(MethodOptions({"a": 1})) == {"a": 1}
