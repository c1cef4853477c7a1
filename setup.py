from setuptools import find_packages, setup

setup(
    name="segmentation",
    version="0.1.0",
    description="Class-incremental semantic segmentation: MiB (CVPR 2020) in modern PyTorch",
    packages=find_packages(include=["segmentation", "segmentation.*"]),
    python_requires=">=3.9",
    # Ranges, so the package also installs into an existing GPU environment
    # (e.g. torch 2.11 / torchvision 0.26). requirements.txt pins the tested stack.
    # The torch floor is the newest feature the code needs (torch.nn.utils.get_total_norm, 2.6):
    # tests/test_requirements.py lists them and compares with MIN_TORCH_VERSION in
    # segmentation/engine/checks.py, which refuses an older torch before training.
    # torchvision 0.21 is the release of torch 2.6.
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "numpy",
        "pillow",
        # Optional at run time: the logger falls back to torch.utils.tensorboard.
        "tensorboardX",
    ],
)
