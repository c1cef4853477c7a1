"""Run under torchrun: each rank accumulates its shard of a dataset, then all-reduces the matrix.

Usage: ``python -m torch.distributed.run --nproc_per_node N tests/dist_metrics_worker.py OUT_DIR``.
Reads ``OUT_DIR/dataset.pt`` (a dict with "num_classes", "preds", "targets") and writes
``OUT_DIR/matrix_rank<r>.pt`` on every rank.
"""
import os
import sys

import torch
import torch.distributed as dist

from segmentation.metrics import ConfusionMatrix


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dataset = torch.load(os.path.join(out_dir, "dataset.pt"))
    metric = ConfusionMatrix(dataset["num_classes"], device="cpu")
    for pred, target in zip(dataset["preds"][rank::world_size], dataset["targets"][rank::world_size]):
        metric.update(pred, target)
    metric.all_reduce()
    torch.save(metric.matrix, os.path.join(out_dir, f"matrix_rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
