"""The CUDA extension nvae_fast._C: built by CI from csrc/, imports without a GPU, fails politely."""

import os

import pytest

from nvae_fast import _ext

from conftest import HAS_CUDA


@pytest.mark.gpu   # checks the build the GPU check makes
@pytest.mark.skipif(os.environ.get("NVAE_FAST_EXPECT_EXT") != "1",
                    reason="set NVAE_FAST_EXPECT_EXT=1 where the install built nvae_fast._C (CI does)")
def test_extension_is_built_and_imports():
    from nvae_fast import _C

    count, error = _C.device_count()
    assert count >= 0 and isinstance(error, str)
    assert _C.cuda_runtime_version() >= 11000
    for name in ("bn_stats", "bn_swish_forward", "bn_swish_backward_reduce", "bn_swish_backward_apply"):
        assert callable(getattr(_C, name))


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_unusable_extension_is_reported_not_fatal():
    reason = _ext.unavailable_reason()
    assert reason is not None and "nvae_fast._C" in reason
    with pytest.raises(RuntimeError, match="nvae_fast._C"):
        _ext.extension()
