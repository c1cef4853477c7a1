"""Split files: cache layout and reuse, fingerprints, checks of stale/wrong files, split_dir, CLI."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from segmentation.data import DatasetError, build_dataset
from segmentation.data import splits
from segmentation.data.synthetic import item_with_labels, write_voc_layout
from segmentation.signals import STOP_SIGNALS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = [{15}, {16}, {3, 17}, {5, 255}, {0}, {16, 20}, {2, 19}, {1, 255, 18}, {7}, {9, 16}]
VAL = [{1, 16}, {17}, {0}, {4, 255}]


def _write_tree(root, train=TRAIN, val=VAL):
    write_voc_layout(
        os.path.join(root, "PascalVOC12"),
        [item_with_labels(sorted(s), seed=i) for i, s in enumerate(train)],
        [item_with_labels(sorted(s), seed=i) for i, s in enumerate(val)],
    )
    return root


@pytest.fixture
def voc_root(tmp_path):
    return _write_tree(str(tmp_path))


@pytest.fixture
def count_computes(monkeypatch):
    calls = []
    original = splits.compute_split_indices

    def counting(base, dataset, task, split, overlap, num_workers=None):
        calls.append((task, split, overlap))
        return original(base, dataset, task, split, overlap, num_workers)

    monkeypatch.setattr(splits, "compute_split_indices", counting)
    return calls


def test_cache_layout_and_reuse(voc_root, count_computes):
    first = build_dataset("voc", voc_root, "15-5", 1, "train", overlap=True)
    folder = os.path.join(voc_root, "PascalVOC12", "incremental-splits", "15-5-ov")
    # One pass writes every step of the split.
    assert sorted(os.listdir(folder)) == ["train-0.json", "train-0.npy", "train-1.json", "train-1.npy"]
    stored = np.load(os.path.join(folder, "train-1.npy"))
    assert stored.dtype == np.int64 and stored.ndim == 1
    assert stored.tolist() == first.base_indices.tolist() == [1, 2, 5, 6, 7, 9]
    assert count_computes == [("15-5", "train", True)]

    second = build_dataset("voc", voc_root, "15-5", 0, "train", overlap=True)
    assert count_computes == [("15-5", "train", True)]  # reused, not recomputed
    assert second.base_indices.tolist() == [0, 2, 3, 6, 7, 8, 9]

    build_dataset("voc", voc_root, "15-5", 1, "val")
    build_dataset("voc", voc_root, "15-5", 1, "test")
    assert os.path.isfile(os.path.join(voc_root, "PascalVOC12", "incremental-splits", "15-5", "test-1.npy"))
    assert len(count_computes) == 3


def test_changed_list_invalidates_the_cache(voc_root, count_computes):
    build_dataset("voc", voc_root, "15-5", 0, "train")
    _write_tree(voc_root, train=TRAIN + [{1}])
    dataset = build_dataset("voc", voc_root, "15-5", 0, "train")
    assert len(count_computes) == 2
    assert dataset.base_indices.tolist() == [0, 3, 8, 10]


def test_tampered_cache_file_is_recomputed(voc_root, count_computes):
    build_dataset("voc", voc_root, "15-5", 0, "train")
    path = os.path.join(voc_root, "PascalVOC12", "incremental-splits", "15-5", "train-0.npy")
    np.save(path, np.array([1, 2], dtype=np.int64))  # images of step 1, fingerprint unchanged
    dataset = build_dataset("voc", voc_root, "15-5", 0, "train")
    assert len(count_computes) == 2
    assert dataset.base_indices.tolist() == [0, 3, 8]
    with open(path[:-4] + ".json") as handle:
        assert json.load(handle)["num_images"] == 3


def _reference_dir(tmp_path, arrays):
    folder = tmp_path / "reference" / "15-5"
    folder.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(folder / name, array)
    return str(folder)


def test_split_dir_files_are_used(voc_root, tmp_path, count_computes):
    split_dir = _reference_dir(
        tmp_path, {"train-0.npy": np.array([3, 0]), "test_on_val-1.npy": np.array([3, 1])}
    )
    dataset = build_dataset("voc", voc_root, "15-5", 0, "train", split_dir=split_dir)
    assert dataset.base_indices.tolist() == [3, 0]  # the file's order, not re-sorted
    assert build_dataset("voc", voc_root, "15-5", 1, "test", split_dir=split_dir).base_indices.tolist() == [
        3,
        1,
    ]
    assert count_computes == []
    # val is not in split_dir: computed into the cache.
    assert build_dataset("voc", voc_root, "15-5", 1, "val", split_dir=split_dir).base_indices.tolist() == [
        0,
        1,
    ]
    assert count_computes == [("15-5", "val", False)]


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([0.0, 3.0]), "1-D integer array"),
        (np.array([[0, 3]]), "1-D integer array"),
        (np.array([0, 3, 10]), "indices span 0..10"),
        (np.array([-1, 3]), "indices span -1..3"),
        (np.array([0, 3, 3]), "duplicate"),
        (np.array([0, 1, 3]), "does not belong to this step"),  # image 1 holds class 16
        (np.array([0, 2, 3]), "does not belong to this step"),  # overlapped file, disjoint run
    ],
)
def test_wrong_split_dir_file_is_an_error(voc_root, tmp_path, array, message):
    split_dir = _reference_dir(tmp_path, {"train-0.npy": array})
    with pytest.raises(DatasetError, match=message) as info:
        build_dataset("voc", voc_root, "15-5", 0, "train", split_dir=split_dir)
    assert "train-0.npy" in str(info.value)


def test_split_dir_problems(voc_root, tmp_path):
    split_dir = _reference_dir(tmp_path, {"val-0.npy": np.array([0])})
    with pytest.raises(FileNotFoundError, match="train-0.npy"):
        build_dataset("voc", voc_root, "15-5", 0, "train", split_dir=split_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("voc", voc_root, "15-5", 0, "train", split_dir=str(tmp_path / "nowhere"))
    with open(os.path.join(split_dir, "train-0.npy"), "wb") as handle:
        handle.write(b"not a numpy file")
    with pytest.raises(DatasetError, match="cannot be read as a .npy"):
        build_dataset("voc", voc_root, "15-5", 0, "train", split_dir=split_dir)


def test_empty_step_is_an_error(voc_root):
    with pytest.raises(DatasetError, match="no image .* val step 4"):
        build_dataset("voc", voc_root, "15-1", 4, "val")


def test_cli_writes_reference_format(voc_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    splits.main(["--dataset", "voc", "--data_root", voc_root, "--task", "15-1", "--overlap", "--out", out])
    assert sorted(os.listdir(out)) == [f"train-{step}.npy" for step in range(6)]
    for step in range(6):
        written = np.load(os.path.join(out, f"train-{step}.npy"))
        assert written.dtype == np.int64
        assert (
            written.tolist()
            == build_dataset("voc", voc_root, "15-1", step, "train", True).base_indices.tolist()
        )
    # The written folder works as a split_dir.
    dataset = build_dataset("voc", voc_root, "15-1", 1, "train", True, split_dir=out)
    assert dataset.base_indices.tolist() == [1, 5, 9]
    assert "train-5.npy: 1 images" in capsys.readouterr().out


def test_cli_as_module(voc_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    options = ["--dataset", "voc", "--data_root", voc_root, "--task", "15-5", "--out", out]
    done = subprocess.run(
        [sys.executable, "-m", "segmentation.data.splits", *options], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert np.load(os.path.join(out, "train-0.npy")).tolist() == [0, 3, 8]
    # A missing data root: exit code 1 and one line, no traceback (the module's main in this
    # process, which the module runs as its __main__: a new interpreter adds nothing here).
    with pytest.raises(SystemExit) as failed:
        splits.main([*options, "--data_root", str(tmp_path / "missing")])
    stderr = capsys.readouterr().err
    assert failed.value.code == 1 and "missing" in stderr and "Traceback" not in stderr


def test_parallel_scan_equals_serial(voc_root):
    base = splits.read_base_list("voc", voc_root, "train")
    assert np.array_equal(
        splits.scan_presence(base, num_workers=2), splits.scan_presence(base, num_workers=1)
    )


def _probe_signalling_itself(image, label, dataset):
    for name in STOP_SIGNALS:
        os.kill(os.getpid(), getattr(signal, name))
    return np.ones(256, dtype=bool)


def test_scan_workers_survive_the_stop_signals(voc_root, monkeypatch, trainer_handlers):
    # Slurm sends the stop signals to every process of a job step. A scan worker that died of one
    # would make the pool wait for its files for ever; the trainer (the parent) handles them. The
    # probe runs in the forked workers and signals itself.
    monkeypatch.setattr(splits, "labels_present", _probe_signalling_itself)
    base = splits.read_base_list("voc", voc_root, "train")
    rows = splits.scan_presence(base, num_workers=2)
    assert rows.shape == (len(TRAIN), 256) and rows.all()


def _distributed_worker(rank, store, root, broken_root, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    computed = []
    original = splits.compute_split_indices
    splits.compute_split_indices = lambda *args, **kwargs: computed.append(1) or original(*args, **kwargs)
    try:
        indices = build_dataset("voc", root, "15-5", 1, "train").base_indices.tolist()
        computes = len(computed)
        try:
            build_dataset("voc", broken_root, "15-5", 1, "train")
            error = None
        except (DatasetError, FileNotFoundError) as caught:
            error = str(caught)
        with open(os.path.join(results, f"rank{rank}.json"), "w") as handle:
            json.dump({"indices": indices, "computed": computes, "error": error}, handle)
    finally:
        splits.compute_split_indices = original
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_rank0_computes_and_broadcasts(voc_root, tmp_path):
    import torch.multiprocessing as mp

    results = tmp_path / "results"
    results.mkdir()
    broken_root = _write_tree(str(tmp_path / "broken"))
    broken_label = os.path.join(broken_root, "PascalVOC12", "SegmentationClassAug", "syn_train_000004.png")
    with open(broken_label, "wb") as handle:
        handle.write(b"garbage")
    mp.start_processes(
        _distributed_worker,
        args=(str(tmp_path / "store"), voc_root, broken_root, str(results)),
        nprocs=2,
        start_method="fork",
    )
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["computed"] for r in ranks] == [1, 0]
    assert ranks[0]["indices"] == ranks[1]["indices"] == [1, 2, 5, 6, 7, 9]
    # Rank 0's error (reading the labels) reaches rank 1 instead of leaving it waiting.
    assert "syn_train_000004.png" in ranks[0]["error"]
    assert "rank 0 failed" in ranks[1]["error"] and "syn_train_000004.png" in ranks[1]["error"]
