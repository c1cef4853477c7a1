"""The run's numerics settings: In-Place ABN's kernels, TF32 and cuDNN's autotuner, set explicitly and described."""
import pytest
import torch

from segmentation.engine.backends import configure_backends
from segmentation.models import norm_kernels


@pytest.fixture
def restore_backends():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
    norm_kernels.set_kernel_mode("auto")


@pytest.mark.parametrize("tf32", ["on", "off"])
def test_tf32_is_set_for_convolutions_and_matrix_products_alike(restore_backends, tf32):
    # PyTorch's defaults differ (convolutions on, matrix products off); a run sets both.
    torch.backends.cuda.matmul.allow_tf32 = tf32 == "off"
    torch.backends.cudnn.allow_tf32 = tf32 == "off"
    line = configure_backends("auto", tf32, torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == (tf32 == "on")
    assert torch.backends.cudnn.benchmark
    assert line == (f"In-Place ABN kernels: fused (compiled) (--norm_kernels auto); TF32 {tf32} for float32 "
                    "convolutions and matrix products (--tf32); cuDNN autotuner on")


@pytest.mark.parametrize("mode, described", [("auto", "reference operations"), ("fused", "fused (compiled)"),
                                             ("reference", "reference operations")])
def test_norm_kernels_on_the_cpu(restore_backends, mode, described):
    torch.backends.cudnn.benchmark = True
    line = configure_backends(mode, "on", torch.device("cpu"))
    assert norm_kernels.kernel_mode() == mode
    assert norm_kernels.use_fused(torch.zeros(2, 3)) == (mode == "fused")
    assert not torch.backends.cudnn.benchmark
    assert line == f"In-Place ABN kernels: {described} (--norm_kernels {mode})"


def test_unknown_settings_are_refused(restore_backends):
    with pytest.raises(ValueError, match="TF32 setting 'yes'"):
        configure_backends("auto", "yes", torch.device("cpu"))
    with pytest.raises(ValueError, match="kernel mode 'fast'"):
        configure_backends("fast", "on", torch.device("cpu"))
