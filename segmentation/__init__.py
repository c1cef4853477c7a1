"""Class-incremental semantic segmentation (MiB and baselines) in modern PyTorch."""

__version__ = "0.1.0"
