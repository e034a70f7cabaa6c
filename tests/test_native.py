"""Which backends the environment report and "auto" consider usable."""
import pytest
import torch

from pyseqpack import _native


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine whose torch sees no CUDA device")
def test_no_cuda_device_means_no_cuda_backend():
    assert _native.available_backends("cuda") == ["torch"]
    assert not _native.triton_available(torch.device("cuda"))
    with pytest.raises(_native.BackendUnavailable, match="CUDA device"):
        _native.require_triton(torch.device("cuda"))
