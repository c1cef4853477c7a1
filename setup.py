from setuptools import find_packages, setup

setup(
    name="segmentation",
    version="0.1.0",
    description="Class-incremental semantic segmentation: MiB (CVPR 2020) in modern PyTorch",
    packages=find_packages(include=["segmentation", "segmentation.*"]),
    python_requires=">=3.9",
    # Ranges, so the package also installs into an existing GPU environment
    # (e.g. torch 2.11 / torchvision 0.26). requirements.txt pins the tested stack.
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pillow",
        # Optional at run time: the logger falls back to torch.utils.tensorboard.
        "tensorboardX",
    ],
)
