"""Pins the latency cost model's device profile so that plans in tests and doctests never depend
on timing. Lives in the package so it covers the doctests; ``tests/conftest.py`` imports it too.
Not shipped in the wheel (see pyproject.toml)."""

import pytest
import torch

from fxfactorize.costmodels import DeviceProfile, set_device_profile

# A CPU of 50 GFLOP/s and 10 GB/s with no per-call cost, so small test models are judged by
# FLOPs and bytes (close to the MAC rule). Tests that need other numbers pin their own.
TEST_PROFILE = DeviceProfile(flops_per_s=5e10, bytes_per_s=1e10, launch_s=0.0)


@pytest.fixture(autouse=True)
def _pinned_device_profile():
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        set_device_profile(TEST_PROFILE, dtype=dtype)
    yield
    for dtype in dtypes:
        set_device_profile(None, dtype=dtype)
