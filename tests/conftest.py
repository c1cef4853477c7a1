"""Shared by every test: one intra-op thread, a fixed seed, the `cuda` marker's skip, and the
session's shared synthetic dataset and reference training runs.

The shared runs are built once per test session, by whichever pytest-xdist worker asks first
(the others wait for it and reuse the result), and are read-only for the tests: a test that
writes into a run works on ``copy_run``'s copy. Sharing them also tests what the README says:
the options in which their users differ from them (``--num_workers``, ``--ckpt_interval``,
``--sample_num``, the visualisation, the launcher) do not change the weights.
"""
import fcntl
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Callable, List

import pytest
import torch

from train_cli_worker import run_train, run_train_in_process, train_args

# Tests run on 2 CPU cores in CI, one pytest-xdist worker per core; one intra-op thread per
# process keeps parallel runs predictable.
torch.set_num_threads(1)

# The shared MiB run: synthetic 15-5, both steps, in-step checkpoints every 2 iterations.
MIB_OPTIONS = ("--step", "all", "--method", "MiB", "--ckpt_interval", "2")
# The shared two-process run: the same with 2 images per process and LR 0.001.
TWO_PROCESS_LR = "0.001"


@pytest.hookimpl(trylast=True)  # after pytest's own ordering by fixture scope
def pytest_collection_modifyitems(config, items):
    # The slow tests first, so that the xdist workers do not wait for one of them at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def trainer_handlers():
    """The trainer's handlers of the stop signals in this process, which forked workers inherit."""
    from segmentation.signals import STOP_SIGNALS

    previous = {name: signal.signal(getattr(signal, name), lambda signum, frame: None) for name in STOP_SIGNALS}
    yield
    for name, handler in previous.items():
        signal.signal(getattr(signal, name), handler)


def slurm_answers() -> bool:
    """Whether a Slurm controller answers ``scontrol ping`` here."""
    if shutil.which("scontrol") is None:
        return False
    result = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return result.returncode == 0 and "UP" in result.stdout


def use_eager_fused_kernels(monkeypatch) -> None:
    """Select In-Place ABN's fused formulation for every tensor, run eagerly instead of compiled."""
    from segmentation.models import norm_kernels

    monkeypatch.setattr(norm_kernels, "_compiled", {f.__name__: f for f in norm_kernels.FUSED_FUNCTIONS})
    norm_kernels.set_kernel_mode("fused")


@pytest.fixture(params=["reference", "fused"])
def kernels(request, monkeypatch):
    """Both In-Place ABN implementations; the fused one eagerly (test_norm_kernels compiles it)."""
    from segmentation.models import norm_kernels

    if request.param == "fused":
        use_eager_fused_kernels(monkeypatch)
    else:
        norm_kernels.set_kernel_mode("reference")
    yield request.param
    norm_kernels.set_kernel_mode("auto")


def build_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test session across xdist workers."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def copy_run(run: Path, destination: Path) -> Path:
    """A writable copy of a shared run's output folder."""
    shutil.copytree(run, destination, dirs_exist_ok=True)
    return destination


def mib_args(data_root: str, out: Path, *extra: str) -> List[str]:
    """Options of the shared MiB run, writing under ``out``."""
    return train_args(data_root, out, *MIB_OPTIONS, *extra)


def two_process_args(data_root: str, out: Path, *extra: str) -> List[str]:
    """Options of the shared two-process run (run them with ``nproc=2``), writing under ``out``."""
    args = mib_args(data_root, out, *extra)
    args[args.index("--batch_size") + 1] = "2"
    args[args.index("--lr") + 1] = TWO_PROCESS_LR
    return args


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """A data root holding a small synthetic VOC set (40 training images of 64x48)."""
    from segmentation.data.synthetic import DIR_NAME, generate_synthetic_voc

    def build(folder):
        generate_synthetic_voc(str(folder / DIR_NAME), num_train=40, num_val=20, width=64, height=48)

    return str(build_once(tmp_path_factory, "synthetic-data", build))


def mib_run_args(data_root: str, out: Path) -> List[str]:
    """The exact options of the shared MiB run: ``mib_args`` with TensorBoard and one sample image."""
    args = mib_args(data_root, out, "--sample_num", "1")
    args.remove("--no-visualize")
    return args


@pytest.fixture(scope="session")
def mib_run(data_root, tmp_path_factory) -> Path:
    """Both steps of MiB on synthetic 15-5 in one process (``mib_run_args``)."""
    return build_once(tmp_path_factory, "mib-run", lambda out: run_train(mib_run_args(data_root, out)))


@pytest.fixture(scope="session")
def two_process_run(data_root, tmp_path_factory) -> Path:
    """Both steps of MiB on synthetic 15-5 under torchrun, 2 processes of 2 images."""
    return build_once(tmp_path_factory, "two-process-run",
                      lambda out: run_train(two_process_args(data_root, out), nproc=2))


@pytest.fixture(scope="session")
def estimating_step0(data_root, tmp_path_factory) -> Path:
    """Step 0 of FT on synthetic 15-5 that estimates EWC's, PI's and RW's importances on the way (RW's
    score every iteration), in one process: the step 0 of their step-1 runs in test_train_e2e.py and
    test_train_resume.py."""
    return build_once(tmp_path_factory, "estimating-step0", lambda out: run_train_in_process(
        train_args(data_root, out, "--step", "0", "--method", "FT", "--reg_iterations", "1",
                   "--estimate_importance", "ewc", "pi", "rw")))


# The tests that use ``float64_plop_runs`` form one xdist group (pytest.ini: --dist loadgroup), so
# that none waits idle while another worker records the runs.
FLOAT64_PLOP_GROUP = pytest.mark.xdist_group("float64-plop-runs")


@pytest.fixture(scope="session")
def float64_plop_runs(data_root, tmp_path_factory) -> Path:
    """The float64 PLOP runs of the loss traces (``loss_traces.PLOP_RUNS``: step 0, then two step-1
    runs from it), recorded once: their traces in ``traces.json``, the step checkpoints of step 0 and
    of PLOP's step 1 under ``checkpoints/`` (``loss_traces.step_checkpoint``). test_loss_traces.py
    compares the traces with the recording, test_plop_train.py the PLOP step 1 with 2 processes."""
    import json

    from loss_traces import PLOP_RUNS, record

    def build(folder):
        traces = record(data_root, folder, PLOP_RUNS, step_files=["PLOP"])
        (folder / "traces.json").write_text(json.dumps(traces))

    return build_once(tmp_path_factory, "float64-plop-runs", build)


@pytest.fixture
def torch_hub(tmp_path, monkeypatch):
    """An empty torch hub cache under ``tmp_path`` (TORCH_HOME), and no network: a download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # as torch.hub.set_dir was never called
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    for target in ("torch.hub.download_url_to_file", "torch.hub.urlopen", "urllib.request.urlopen"):
        monkeypatch.setattr(target, no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"
