"""The method registry: presets reach the options, and the README's method table lists the registry."""
import os
import re

from segmentation.engine.options import parse_options
from segmentation.methods import REGISTRY, find_method, method_names, method_preset, shares_step0
from segmentation.methods.regularizer import REGULARIZERS

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_rows():
    text = open(README, encoding="utf-8").read()
    table = re.search(r"<!-- methods -->\n(.*?)<!-- /methods -->", text, re.S).group(1)
    body = "\n".join(table.splitlines()[2:])  # below the header and separator lines
    return re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", body, re.M)


def test_readme_method_table_matches_the_registry():
    rows = _readme_rows()
    assert [name for name, _, _ in rows] == list(REGISTRY)
    for name, paper_row, summary in rows:
        assert paper_row.strip() == REGISTRY[name].paper_row
        assert summary.strip() == REGISTRY[name].summary


def test_command_line_offers_every_registered_method_with_its_preset():
    assert method_names() == list(REGISTRY)
    for name, method in REGISTRY.items():
        opts = parse_options(["--dataset", "synthetic", "--method", name.lower(), "--task", "15-5"])
        assert opts.method == name
        for option, value in method.task_preset("15-5").items():
            assert opts.as_dict()[option] == value, (name, option)


def test_regularizer_methods_name_their_regularizer():
    for name in ("EWC", "PI", "RW"):
        preset = method_preset(name, "15-5")
        assert preset["regularizer"] == REGISTRY[name].regularizer
        assert REGULARIZERS[preset["regularizer"]].name == preset["regularizer"]


def test_lookup_accepts_the_original_spellings():
    assert find_method("MIB").name == "MiB" and find_method("lwf_mc").name == "LWF-MC"
    assert find_method("SDR") is None
    assert method_preset("MiB", "15-1")["loss_kd"] == 100.0


def test_only_methods_whose_preset_changes_step_0_train_their_own():
    # LwF-MC's BCE classification acts at step 0, and PLOP's label protocol ignores VOC's void
    # pixels from step 0 on; every other preset acts from step 1 on.
    assert [name for name in REGISTRY if not shares_step0(name)] == ["LWF-MC", "PLOP"]
