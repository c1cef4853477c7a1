"""Throughput of the training data pipeline, per worker process, on VOC-sized synthetic images.

Writes a synthetic VOC set of ``--num_images`` images of ``--width`` x ``--height`` into a
temporary folder, then times one DataLoader-worker-like process (one intra-op thread) on the
training items of VOC 15-5 step 0 (overlapped: most images) at ``--crop_size`` crops. Each
stage runs over the items ``--repeats`` times and the fastest pass is reported (the machine may
be shared):

- decode: reading the JPEG image and PNG label;
- LUT remap: the 256-entry lookup table of this project (``protocol.label_lut``);
- per-pixel remap: the reference's per-pixel Python ``Tensor.apply_`` lambda, for comparison
  (bench only; it is applied to the cropped label, where the reference applied it);
- transform: RandomResizedCrop + flip + normalisation;
- full item with the LUT, and the same with the per-pixel remap instead;

and, once, the split computation (every label file read by parallel worker processes).

With ``--workers 1,2,4``: training images/s of a DataLoader with that many worker processes
(batches of ``--batch_size``, pinned memory when CUDA is available, the first batch excluded so
that worker start-up does not count), and with ``--step_rate R`` (the training step's images/s
per GPU, from ``launch/bench_train.py``) the CPU cores one GPU needs to be fed at that rate;
``--step_rate_from results.jsonl`` takes the fastest step-0 rate of our model that
``launch/bench_train.py`` measured.

Usage: ``python launch/bench_data.py [--num_images 200 --width 500 --height 375 --crop_size 512]
[--workers 1,2,4,8 --step_rate 200 | --step_rate_from bench-out/results.jsonl]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Callable, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segmentation.data import build_dataset, sample_generator  # noqa: E402
from segmentation.data.protocol import apply_lut  # noqa: E402
from segmentation.data.readers import read_base_list, read_image, read_label  # noqa: E402
from segmentation.data.splits import compute_split_indices, default_num_workers  # noqa: E402
from segmentation.data.synthetic import generate_synthetic_voc  # noqa: E402
from segmentation.data.transforms import train_transform  # noqa: E402
from segmentation.engine.trainer import seed_worker  # noqa: E402
from segmentation.tasks import channel_order, labels_of_step  # noqa: E402

TASK, STEP = "15-5", 0
TARGET_STEP_RATE = 200.0  # training images/s per GPU at step 0 (docs/benchmarks.md)


def reference_remap(label: torch.Tensor) -> torch.Tensor:
    """The reference's training remap: one Python call per pixel (old/future/void -> 0)."""
    order = channel_order("voc", TASK, STEP)
    kept = {0, 255} | set(labels_of_step("voc", TASK, STEP))
    inverted = {label: order.index(label) for label in kept if label != 255}
    inverted[255] = 0
    return label.apply_(lambda x: inverted[x] if x in inverted else 0)


def measured_step_rate(results: str) -> Optional[float]:
    """The fastest step-0 images/s of our model in ``launch/bench_train.py``'s results.jsonl, if any."""
    try:
        with open(results) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except OSError:
        return None
    rates = [row["images_per_s"] for row in rows
             if row.get("model") == "ours" and row.get("step") == 0 and row.get("images_per_s")]
    return max(rates) if rates else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(run: Callable[[int], object], count: int, repeats: int) -> float:
    """Seconds per call of run(i) over i = 0..count-1: the fastest of ``repeats`` passes."""
    run(0)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(count):
            run(index)
        best = min(best, (time.perf_counter() - start) / count)
    return best


def loader_images_per_second(dataset: Dataset, workers: int, batch_size: int, total: int) -> float:
    """Training images/s through a DataLoader with ``workers`` processes, over ``total`` items."""
    indices = [i % len(dataset) for i in range(total)]
    batches = [indices[i : i + batch_size] for i in range(0, total - batch_size + 1, batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch
    start = time.perf_counter()
    images = sum(batch[0].shape[0] for batch in iterator)
    return images / (time.perf_counter() - start)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--crop_size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="", help="comma-separated DataLoader worker counts to time")
    parser.add_argument("--batch_size", type=int, default=12, help="per-GPU batch of the DataLoader runs")
    parser.add_argument("--loader_images", type=int, default=600, help="images per DataLoader run")
    parser.add_argument("--step_rate", type=float, default=None,
                        help="training images/s per GPU to feed: prints the CPU cores it needs")
    parser.add_argument("--step_rate_from", default=None, metavar="RESULTS_JSONL",
                        help="--step_rate = the fastest step-0 rate of our model in launch/bench_train.py's "
                        f"results.jsonl (the target, {TARGET_STEP_RATE:.0f}, when it holds none)")
    args = parser.parse_args(argv)
    if args.step_rate_from and args.step_rate is None:
        args.step_rate = measured_step_rate(args.step_rate_from)
        source = f"fastest step-0 rate in {args.step_rate_from}"
        if args.step_rate is None:
            args.step_rate, source = TARGET_STEP_RATE, f"the step-0 target: {args.step_rate_from} holds no rate"
        print(f"step rate: {args.step_rate:.0f} training images/s per GPU ({source})")
    worker_counts = [int(n) for n in args.workers.split(",") if n]
    torch.set_num_threads(1)  # as in a DataLoader worker

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        generate_synthetic_voc(
            os.path.join(root, "SyntheticVOC"),
            num_train=args.num_images,
            num_val=10,
            width=args.width,
            height=args.height,
        )
        generation = time.perf_counter() - start
        base = read_base_list("synthetic", root, "train")
        start = time.perf_counter()
        compute_split_indices(base, "synthetic", TASK, "train", True, num_workers=default_num_workers())
        scan = time.perf_counter() - start
        transform = train_transform(args.crop_size)
        dataset = build_dataset("synthetic", root, TASK, STEP, "train", overlap=True, transform=transform)
        count = len(dataset)
        raw = [read_label(path) for path in dataset.label_paths]
        loaded = [dataset.load(i) for i in range(min(count, 50))]  # in memory, for the transform alone

        def decode(i: int) -> None:
            read_image(dataset.image_paths[i])
            read_label(dataset.label_paths[i])

        def lut_remap(i: int) -> None:
            apply_lut(dataset.lut, raw[i])

        def pixel_remap(i: int) -> None:
            reference_remap(torch.from_numpy(raw[i].astype(np.int64)))

        def transform_only(i: int) -> None:
            transform(*loaded[i], sample_generator(0, 0, i))

        def item_with_pixel_remap(i: int) -> None:
            image = read_image(dataset.image_paths[i])
            label = torch.from_numpy(read_label(dataset.label_paths[i]).astype(np.int64))
            _, label = transform(image, label, sample_generator(0, 0, i))
            reference_remap(label)

        slow = min(count, 50)  # the per-pixel remap takes tens of ms per image
        rows = [
            ("decode image + label", timed(decode, count, args.repeats)),
            ("LUT remap (native size)", timed(lut_remap, count, args.repeats)),
            ("per-pixel apply_ remap (native size)", timed(pixel_remap, slow, args.repeats)),
            ("transform (crop, flip, normalise)", timed(transform_only, len(loaded), args.repeats)),
            ("full item, LUT remap", timed(lambda i: dataset[i], count, args.repeats)),
            (
                f"full item, per-pixel remap after the {args.crop_size} crop",
                timed(item_with_pixel_remap, slow, args.repeats),
            ),
        ]
        loader_rates = [
            (workers, loader_images_per_second(dataset, workers, args.batch_size, args.loader_images))
            for workers in worker_counts
        ]

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per process")
    print(
        f"data: {count} synthetic training images of {args.width}x{args.height} (VOC {TASK} step {STEP}, "
        f"overlapped), crops {args.crop_size}x{args.crop_size}; generation took {generation:.1f} s"
    )
    print(
        f"split computation: {len(base)} label files read in {scan:.2f} s by {default_num_workers()} processes "
        f"({len(base) / scan:.0f} labels/s)"
    )
    print()
    print("| stage (one worker process) | ms / image | images / s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1000:.2f} | {1 / seconds:.0f} |")
    if loader_rates:
        print()
        print(f"| DataLoader workers (batch {args.batch_size}, {args.loader_images} images) | images / s "
              "| images / s per worker |")
        print("|---:|---:|---:|")
        for workers, rate in loader_rates:
            print(f"| {workers} | {rate:.0f} | {rate / max(workers, 1):.0f} |")
    if args.step_rate:
        per_process = 1 / dict(rows)["full item, LUT remap"]
        per_worker = max(rate / max(workers, 1) for workers, rate in loader_rates) if loader_rates else per_process
        print()
        print(
            f"cores per GPU for {args.step_rate:.0f} training images/s: {args.step_rate / per_process:.1f} at the "
            f"single-process rate ({per_process:.0f} images/s), {args.step_rate / per_worker:.1f} at the best "
            f"DataLoader rate per worker ({per_worker:.0f} images/s)"
        )


if __name__ == "__main__":
    main()
