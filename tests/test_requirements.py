"""setup.py's torch floor against the torch features the code uses, and the check that refuses an
older torch before training.

``TORCH_FEATURES`` lists the recent torch APIs that the package, train.py and launch/ use, each with
the torch release that introduced it and a file that uses it. The tests keep the table honest (each
feature is used where it says, and exists in the installed torch) and the floor true (setup.py's
``torch>=`` is at least the newest feature the code cannot do without, and equals
``MIN_TORCH_VERSION`` of the check before training).
"""
import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import torch
import torchvision

from option_helpers import synthetic_config
from segmentation.engine.checks import MIN_TORCH_VERSION, check_torch_version, run_checks
from segmentation.engine.run_files import RunFiles
from segmentation.errors import SetupError

REPO = Path(__file__).resolve().parents[1]
Version = Tuple[int, int]


@dataclass(frozen=True)
class Feature:
    name: str
    version: Version  # the release that introduced it
    used: str  # a regular expression matching its use (on one line) in ``where``
    where: str  # a file of the repository that uses it
    available: Callable[[], object]  # fails (or returns False) where the installed library lacks it
    fallback: str = ""  # how the code runs without it: such a feature does not raise the floor


TORCH_FEATURES = [
    Feature("torch.nn.utils.get_total_norm", (2, 6), r"torch\.nn\.utils\.get_total_norm\(",
            "segmentation/engine/trainer.py", lambda: torch.nn.utils.get_total_norm),
    Feature("torch._dynamo.config.recompile_limit", (2, 7), r'"recompile_limit"',
            "segmentation/models/norm_kernels.py", lambda: hasattr(torch._dynamo.config, "recompile_limit"),
            fallback="cache_size_limit, its name before 2.7"),
    Feature("torch.amp.GradScaler(device, ...)", (2, 3), r"torch\.amp\.GradScaler\(device",
            "segmentation/engine/trainer.py",
            lambda: "device" in inspect.signature(torch.amp.GradScaler).parameters),
    Feature("torch.compiler.is_compiling", (2, 3), r"torch\.compiler\.is_compiling\(",
            "segmentation/models/norm_kernels.py", lambda: torch.compiler.is_compiling),
    Feature("torch.distributed.DistError", (2, 2), r'getattr\(dist, "DistError"',
            "segmentation/distributed.py", lambda: torch.distributed.DistError,
            fallback="getattr(dist, 'DistError', ()): the error message is matched instead"),
    Feature("torch.utils.flop_counter.FlopCounterMode", (2, 1), r"from torch\.utils\.flop_counter import",
            "launch/bench_train.py", lambda: importlib.import_module("torch.utils.flop_counter").FlopCounterMode),
    Feature("torch.compile", (2, 0), r"torch\.compile\(", "segmentation/models/norm_kernels.py",
            lambda: torch.compile),
    Feature("torch.optim.lr_scheduler.LRScheduler (public name)", (2, 0), r"lr_scheduler\.LRScheduler\b",
            "segmentation/engine/optim.py", lambda: torch.optim.lr_scheduler.LRScheduler),
    Feature("torch.var_mean(..., correction=)", (2, 0), r"torch\.var_mean\(.*correction=",
            "segmentation/models/norm_kernels.py", lambda: torch.var_mean(torch.ones(3), dim=0, correction=0)),
    Feature("torch.load(..., weights_only=)", (1, 13), r"torch\.load\(.*weights_only=",
            "segmentation/models/pretrained.py",
            lambda: "weights_only" in inspect.signature(torch.load).parameters),
    Feature("torch.autograd.graph.saved_tensors_hooks", (1, 10), r"saved_tensors_hooks\(",
            "launch/bench_norm_memory.py", lambda: torch.autograd.graph.saved_tensors_hooks),
    Feature("torch.autocast(device_type=...)", (1, 10), r"torch\.autocast\(device_type=",
            "segmentation/engine/evaluation.py", lambda: torch.autocast),
    Feature("torch._foreach_add_/_sub/_mul on tensor lists", (1, 7), r"torch\._foreach_(add_|sub|mul)\(",
            "segmentation/methods/regularizer.py",
            lambda: torch._foreach_add_([torch.ones(1)], torch._foreach_mul([torch.ones(1)], [torch.ones(1)]),
                                        alpha=2.0)),
]

TORCHVISION_FEATURES = [
    Feature("torchvision.models.get_model_weights", (0, 14), r"get_model_weights\(",
            "segmentation/models/pretrained.py", lambda: torchvision.models.get_model_weights),
]

ALL_FEATURES = TORCH_FEATURES + TORCHVISION_FEATURES


def _version(text: str) -> Version:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def _setup_floors() -> Dict[str, Version]:
    """The ``>=`` floors of setup.py's install_requires, by package (setup.py is not run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"]
    requires = next(keyword.value for keyword in calls[0].keywords if keyword.arg == "install_requires")
    floors = {}
    for requirement in ast.literal_eval(requires):
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
        if match:
            floors[match.group(1)] = _version(match.group(2))
    return floors


def _requirements_pins() -> Dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line.split("#")[0].strip())
        if match:
            pins[match.group(1)] = _version(match.group(2))
    return pins


def _torchvision_of(torch_version: Version) -> Version:
    """The torchvision release made with a torch 2.x release (2.6 -> 0.21, 2.14 -> 0.29)."""
    assert torch_version[0] == 2, torch_version
    return 0, torch_version[1] + 15


@pytest.mark.parametrize("feature", ALL_FEATURES, ids=lambda feature: feature.name)
def test_feature_is_used_where_the_table_says(feature):
    text = (REPO / feature.where).read_text()
    assert re.search(feature.used, text), f"{feature.name}: no match of {feature.used!r} in {feature.where}"


@pytest.mark.parametrize("feature", ALL_FEATURES, ids=lambda feature: feature.name)
def test_feature_exists_in_the_installed_version(feature):
    assert feature.available() is not False, feature.name


def test_setup_floors_cover_every_feature_without_fallback():
    floors = _setup_floors()
    needed = max(feature.version for feature in TORCH_FEATURES if not feature.fallback)
    assert needed == (2, 6)  # torch.nn.utils.get_total_norm; update the README's requirements with it
    assert floors["torch"] >= needed
    assert floors["torch"] == MIN_TORCH_VERSION, "setup.py and segmentation/engine/checks.py disagree"
    assert floors["torchvision"] == _torchvision_of(floors["torch"])
    assert floors["torchvision"] >= max(feature.version for feature in TORCHVISION_FEATURES if not feature.fallback)


def test_pinned_versions_meet_the_floors():
    pins, floors = _requirements_pins(), _setup_floors()
    assert pins["torch"] >= floors["torch"] and pins["torchvision"] >= floors["torchvision"]
    assert pins["torchvision"] == _torchvision_of(pins["torch"])
    check_torch_version()  # the installed torch too


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0a0+git1234567", "2.10.1+cu128", "2.14.1+cpu", "3.0.0"])
def test_recent_torch_versions_pass(version):
    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.5.1+cu124", "2.4.0", "1.13.1"])
def test_older_torch_is_refused_with_the_versions(version):
    with pytest.raises(SetupError) as error:
        check_torch_version(version)
    message = str(error.value)
    assert f"torch {version} is installed" in message and "torch >= 2.6" in message
    assert "requirements.txt" in message


def test_run_checks_refuse_an_older_torch_before_anything_else(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    config = synthetic_config("--backbone", "resnet18", checkpoint_dir=str(tmp_path / "checkpoints"),
                              logdir=str(tmp_path / "logs"))
    with pytest.raises(SetupError, match=r"torch 2\.5\.1\+cu124 is installed, but this code needs torch >= 2\.6"):
        run_checks(config, RunFiles(config))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()
