"""Fault handling below the command line: checkpoint verification, write errors on a full disk,
the run lock, non-finite losses and gradients, dead or stalled data-loader workers."""
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from option_helpers import synthetic_config
from segmentation.engine.checkpoint import CheckpointError, InStepCheckpoints, atomic_save, load_checkpoint
from segmentation.engine.loader_watch import DataLoaderFailure
from segmentation.engine.run_lock import RunLock, RunLockedError
from segmentation.engine.sampler import GlobalBatchSampler
from segmentation.engine.trainer import NonFiniteLossError, Trainer
from test_train_trainer import cross_entropy_step
from segmentation.files import WriteError, atomic_write
from segmentation.methods.method import StepInfo
from segmentation.methods.step_methods import StepMethods
from segmentation.models.norm import ABN


# ---------------------------------------------------------------- checkpoints
def _saved(tmp_path):
    path = tmp_path / "step0.pth"
    atomic_save({"model_state": {"weight": torch.arange(4096.0)}, "step": 0}, path)
    return path


def test_truncated_checkpoint_is_reported_with_path_and_remedy(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*step0\.pth.*; retrain it"):
        load_checkpoint(path, "retrain it")


def test_flipped_tensor_byte_fails_the_checksum(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    # torch.save stores tensor bytes uncompressed: find the tensor and flip one of its bytes.
    offset = bytes(data).index(torch.arange(4096.0)[1000:1002].numpy().tobytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step0\.pth is corrupt: .*checksum"):
        load_checkpoint(path)


def test_checksum_is_verified_and_removed_on_load(tmp_path):
    loaded = load_checkpoint(_saved(tmp_path))
    assert set(loaded) == {"model_state", "step"}
    assert torch.equal(loaded["model_state"]["weight"], torch.arange(4096.0))


def test_in_step_loading_skips_a_corrupt_newest_checkpoint(tmp_path):
    in_step = InStepCheckpoints(tmp_path, 0)
    in_step.save({"iteration": 2, "weight": torch.ones(3)}, 2)
    newest = in_step.save({"iteration": 4, "weight": torch.ones(3)}, 4)
    newest.write_bytes(b"garbage")
    assert in_step.latest()["iteration"] == 2


# ---------------------------------------------------------------- write errors
@contextmanager
def _file_size_limit(limit_bytes):
    """Writes beyond ``limit_bytes`` fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextmanager
def _small_filesystem(tmp_path, megabytes):
    """A tmpfs of ``megabytes`` (needs root); skips the test where it cannot be mounted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the file size limit test covers write errors")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _checkpoint_of(megabytes, value):
    return {"weight": torch.full((megabytes * 2**18,), float(value))}


def test_full_disk_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    with _small_filesystem(tmp_path, 3) as folder:
        target = folder / "step0.pth"
        atomic_save(_checkpoint_of(2, 1), target)
        with pytest.raises(WriteError, match=rf"cannot write {target}: No space left on device"):
            atomic_save(_checkpoint_of(2, 2), target)
        assert os.listdir(folder) == ["step0.pth"]
        assert torch.equal(load_checkpoint(target)["weight"], _checkpoint_of(2, 1)["weight"])


def test_write_error_names_the_path_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "step0.json"
    atomic_write(target, lambda handle: handle.write("old"), "w")
    checkpoint_path = tmp_path / "step0.pth"
    atomic_save(_checkpoint_of(1, 1), checkpoint_path)
    with _file_size_limit(64 * 1024):
        with pytest.raises(WriteError, match=rf"cannot write {target}: File too large.*kept"):
            atomic_write(target, lambda handle: handle.write("x" * 10**6), "w")
        with pytest.raises(WriteError, match=rf"cannot write {checkpoint_path}"):
            atomic_save(_checkpoint_of(1, 2), checkpoint_path)
    assert target.read_text() == "old"
    assert torch.equal(load_checkpoint(checkpoint_path)["weight"], _checkpoint_of(1, 1)["weight"])
    assert sorted(os.listdir(tmp_path)) == ["step0.json", "step0.pth"]


# ---------------------------------------------------------------- run lock
def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=rf"another run is writing to {tmp_path / 'run'} "
                                                 rf"\(host .*, pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / ".lock").exists()
    with RunLock(tmp_path / "run"):  # released: free again
        pass


def test_lock_of_a_killed_process_is_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from segmentation.engine.run_lock import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()  # left behind by the crash, but no longer locked
    with RunLock(tmp_path):
        pass


# ---------------------------------------------------------------- non-finite values
class TinySegmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), ABN(4))
        self.cls = nn.ModuleList([nn.Conv2d(4, 3, 1)])

    def forward(self, x, features=()):
        body = self.body(x)
        logits = self.cls[0](body)
        return (logits, {"body": body}) if features else logits


class RandomSet(Dataset):
    def __init__(self, n=12, die_at=None, stall_at=None):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(n, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (n, 8, 8), generator=generator)
        self.image_paths = [f"image-{index}.jpg" for index in range(n)]
        self.die_at = die_at
        self.stall_at = stall_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if index == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        if index == self.stall_at:
            time.sleep(60)
        return self.images[index], self.labels[index]


class PoisonedLoss(StepMethods):
    """Cross-entropy whose value becomes NaN at the given iterations (1-based)."""

    def __init__(self, bad_iterations):
        super().__init__(synthetic_config(), StepInfo(step=0, num_old_channels=0, num_channels=16))
        self.bad_iterations = set(bad_iterations)
        self.calls = 0

    def loss(self, outputs):
        self.calls += 1
        if self.calls in self.bad_iterations:
            outputs.logits = outputs.logits * float("nan")
        return super().loss(outputs)


def _trainer(tmp_path, loss=None, dataset=None, amp="off", max_bad_iterations=0, num_workers=0,
             loader_timeout=0.0, epochs=3):
    torch.manual_seed(0)
    model = TinySegmenter()
    dataset = dataset or RandomSet()
    sampler = GlobalBatchSampler(len(dataset), 3, 0, 1, seed=5)  # 4 iterations per epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    trainer = Trainer(
        model, None, loss or cross_entropy_step(), optimizer, scheduler, dataset, sampler,
        device=torch.device("cpu"), epochs=epochs, seed=5, amp=amp, num_workers=num_workers,
        checkpoints=InStepCheckpoints(tmp_path, 0), ckpt_interval=3, print_interval=10,
        checkpoint_meta={"dataset": "d", "task": "t", "step": 0, "classes": [3]},
        max_bad_iterations=max_bad_iterations, loader_timeout=loader_timeout,
    )
    return trainer, model


def _in_step_iterations(tmp_path):
    return [int(p.stem.split("iter")[1]) for p in InStepCheckpoints(tmp_path, 0).paths()]


def test_nan_loss_stops_naming_the_first_bad_iteration_and_term(tmp_path):
    # Host checks every 4 iterations here (epoch ends) and at checkpoints (every 3): iteration
    # 5 is bad, the check after iteration 6 finds it and must name 5, not 6.
    trainer, model = _trainer(tmp_path, loss=PoisonedLoss({5}))
    with pytest.raises(NonFiniteLossError, match=r"step 0: non-finite value \(NaN or Inf\) in loss_cls "
                                                 r"at iteration 5; .*checkpoint \(iteration 4\) is kept"):
        trainer.train()
    assert _in_step_iterations(tmp_path) == [3, 4]
    saved = InStepCheckpoints(tmp_path, 0).latest()
    assert all(torch.isfinite(value).all() for value in saved["model_state"].values() if value.is_floating_point())


def test_nan_gradient_with_a_finite_loss_is_reported_as_the_gradient(tmp_path):
    trainer, model = _trainer(tmp_path)
    calls = []

    def poison(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 2 else grad

    model.cls[0].weight.register_hook(poison)
    with pytest.raises(NonFiniteLossError, match="in the gradient at iteration 2"):
        trainer.train()
    assert _in_step_iterations(tmp_path) == []


def test_fp16_scaler_skipped_steps_are_not_errors(tmp_path):
    trainer, model = _trainer(tmp_path, amp="fp16")
    calls = []

    def overflow(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) in (2, 7) else grad

    model.cls[0].weight.register_hook(overflow)
    trainer.train()
    assert trainer.iteration == 12 and trainer.bad_iterations == 0
    assert trainer.scaler.get_scale() < 2.0**16  # the scaler did skip and back off


def test_max_bad_iterations_skips_with_a_warning_each(tmp_path, caplog):
    trainer, model = _trainer(tmp_path, loss=PoisonedLoss({2, 9}), max_bad_iterations=2)
    trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "iteration skipped" in r.getMessage()]
    assert len(warnings) == 2 and "loss_cls at iteration 2" in warnings[0] and "at iteration 9" in warnings[1]
    assert all(torch.isfinite(value).all() for value in model.state_dict().values() if value.is_floating_point())

    trainer, _ = _trainer(tmp_path / "strict", loss=PoisonedLoss({2, 9}), max_bad_iterations=1)
    with pytest.raises(NonFiniteLossError, match="at iteration 9"):
        trainer.train()


def test_skipped_iteration_leaves_the_weights_unchanged(tmp_path):
    trainer, model = _trainer(tmp_path, loss=PoisonedLoss({1}), max_bad_iterations=1, epochs=1)
    before = {key: value.clone() for key, value in model.named_parameters()}
    original = trainer.run_step
    after_first = {}

    def run_step(images, labels):
        components = original(images, labels)
        if not after_first:
            after_first.update({key: value.clone() for key, value in model.named_parameters()})
        return components

    trainer.run_step = run_step
    trainer.train()
    assert trainer.bad_iterations == 1
    for key, value in before.items():
        assert torch.equal(after_first[key], value), key
        assert not torch.equal(model.get_parameter(key), value), key  # the other iterations trained


# ---------------------------------------------------------------- data-loader workers
def test_dead_loader_worker_is_reported_with_its_sample(tmp_path):
    trainer, _ = _trainer(tmp_path, dataset=RandomSet(die_at=7), num_workers=1)
    with pytest.raises(DataLoaderFailure, match=r"worker 0: sample 7 \(image-7\.jpg\)"):
        trainer.train()


def test_stalled_loader_worker_times_out_naming_its_sample(tmp_path):
    trainer, _ = _trainer(tmp_path, dataset=RandomSet(stall_at=4), num_workers=1, loader_timeout=2.0)
    start = time.monotonic()
    with pytest.raises(DataLoaderFailure, match=r"timed out after 2.0 seconds.*worker 0: sample 4 \(image-4\.jpg\)"):
        trainer.train()
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("variable, count", [("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")])
def test_a_fault_for_one_rank_finds_its_rank_under_torchrun_and_srun(variable, count, monkeypatch):
    from segmentation.faults import fault_point

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    # An unknown action raises once the point and the rank match: the action itself is not run here.
    monkeypatch.setenv("SEGMENTATION_FAULT", "check:train-iteration:3@1")
    monkeypatch.setenv(count, "2")
    monkeypatch.setenv(variable, "0")
    fault_point("train-iteration:3")  # another rank: nothing
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ValueError, match="unknown action 'check'"):
        fault_point("train-iteration:3")
