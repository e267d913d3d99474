"""The suite's pinned device profile: every test plans with it unless it asks for the real device."""

import os
import subprocess
import sys

import pytest

from fxfactorize.conftest import _REAL_PROFILE_ENV, TEST_PROFILE
from fxfactorize.costmodels import device_profile
from fxfactorize.costmodels.roofline import PROFILE_ENV, profile_from_env, resolve_device_profile


@pytest.fixture(scope="module")
def module_scoped_profile():
    return device_profile()


def test_fixtures_of_any_scope_and_subprocesses_see_the_pinned_profile(module_scoped_profile):
    assert module_scoped_profile == TEST_PROFILE
    assert device_profile() == TEST_PROFILE
    code = "from fxfactorize.costmodels import device_profile; print(device_profile())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == repr(TEST_PROFILE)


@pytest.mark.real_device
def test_a_real_device_test_gets_the_runs_own_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("FXFACTORIZE_CACHE_DIR", str(tmp_path))  # measured, never the user's cache
    found = resolve_device_profile()
    assert found.source != "pinned"
    assert os.environ.get(PROFILE_ENV) == _REAL_PROFILE_ENV
    if _REAL_PROFILE_ENV is not None:  # the run was started as if on another machine
        assert found.profile == profile_from_env()
    assert found.profile.flops_per_s > 0 and found.profile.launch_s >= 0


def test_the_pin_is_back_after_a_real_device_test():
    assert resolve_device_profile().source == "pinned"
    assert device_profile() == TEST_PROFILE
