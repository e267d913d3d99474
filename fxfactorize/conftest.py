"""Pins the latency cost model's device profile so that plans in tests and doctests never depend
on the machine's speed. Lives in the package so it covers the doctests; ``tests/conftest.py``
imports it too. Not shipped in the wheel (see pyproject.toml).

The pin is made when this file is imported (before any fixture of any scope runs) and in the
environment (so subprocesses see it too), and restored after every test. A test that wants the
real device says so with ``@pytest.mark.real_device``: the pin is lifted for that test alone.
"""

import os

import pytest
import torch

from fxfactorize.costmodels import DeviceProfile, set_device_profile, set_model_timer
from fxfactorize.costmodels.roofline import PROFILE_ENV

# A CPU of 50 GFLOP/s and 10 GB/s with no per-call cost, so small test models are judged by
# FLOPs and bytes (close to the MAC rule). Tests that need other numbers pin their own.
TEST_PROFILE = DeviceProfile(flops_per_s=5e10, bytes_per_s=1e10, launch_s=0.0)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# What "the real device" is in this run: the environment's profile if one is set (to run the
# suite as if on another machine, e.g. FXFACTORIZE_DEVICE_PROFILE=1e9,1e8,1), else measured.
_REAL_PROFILE_ENV = os.environ.get(PROFILE_ENV)


def _pin(profile: DeviceProfile | None) -> None:
    for dtype in _DTYPES:
        set_device_profile(profile, dtype=dtype)


def _pin_test_profile() -> None:
    _pin(TEST_PROFILE)
    p = TEST_PROFILE
    os.environ[PROFILE_ENV] = f"{p.flops_per_s},{p.bytes_per_s},{p.launch_s}"


_pin_test_profile()


@pytest.fixture(autouse=True)
def _pinned_device_profile(request: pytest.FixtureRequest):
    real = request.node.get_closest_marker("real_device") is not None
    if real:
        _pin(None)
        if _REAL_PROFILE_ENV is None:
            os.environ.pop(PROFILE_ENV, None)
        else:
            os.environ[PROFILE_ENV] = _REAL_PROFILE_ENV
    yield
    _pin_test_profile()  # whatever the test pinned or unpinned
    set_model_timer(None)  # and whatever timer it injected
