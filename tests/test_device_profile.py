"""The latency cost model's device profile (issue 13): plans that do not flip with measurement
noise, a cache key that names the machine, a corrupt cache re-measured. No test depends on the
machine's speed: profiles are pinned or ``roofline._measure`` is faked."""

import json
import math
import warnings

import pytest
import torch
from torch import nn

import fxfactorize as ff
from fxfactorize.costmodels import (
    DeviceProfile,
    roofline,
    set_device_profile,
)

# --- the cache: key and corrupt files ------------------------------------------------------------


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty cache dir, no pinned or environment profile, and a fake measurement (1, 2, 3)."""
    monkeypatch.setenv("FXFACTORIZE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(roofline.PROFILE_ENV, raising=False)
    monkeypatch.setattr(roofline, "_MEASURED", {})
    set_device_profile(None)
    calls = []

    def measure(device, dtype):
        calls.append((device, dtype))
        return DeviceProfile(1.0 * len(calls), 2.0, 3.0)

    monkeypatch.setattr(roofline, "_measure", measure)
    return tmp_path / "device_profiles.json", calls


def test_the_profile_key_names_the_cpu_model_threads_dtype_and_torch(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU 9000 @ 3GHz\n")
    monkeypatch.setattr(roofline, "_CPUINFO", cpuinfo)
    key = roofline.profile_key("cpu", torch.float64)
    assert "Test CPU 9000 @ 3GHz" in key
    assert f"threads{torch.get_num_threads()}" in key
    assert "torch.float64" in key and torch.__version__ in key
    monkeypatch.setattr(roofline, "_CPUINFO", tmp_path / "missing")  # not Linux
    monkeypatch.setattr(roofline.platform, "processor", lambda: "Other CPU")
    assert "|Other CPU|" in roofline.profile_key()


def test_the_real_key_names_this_machines_cpu_model():
    try:
        text = roofline._CPUINFO.read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    names = [line.partition(":")[2].strip() for line in text.splitlines() if "model name" in line]
    if not names:
        pytest.skip("/proc/cpuinfo names no model")
    assert f"cpu|{names[0]}|threads" in roofline.profile_key()


def test_machines_sharing_a_cache_file_keep_their_own_profiles(empty_cache, tmp_path, monkeypatch):
    path, calls = empty_cache
    for name in ("CPU A", "CPU B"):
        cpuinfo = tmp_path / name
        cpuinfo.write_text(f"model name\t: {name}\n")
        monkeypatch.setattr(roofline, "_CPUINFO", cpuinfo, raising=False)
        roofline._MEASURED.clear()  # another process
        roofline.device_profile()
    keys = sorted(json.loads(path.read_text()))
    assert len(calls) == 2 and len(keys) == 2
    assert "CPU A" in keys[0] and "CPU B" in keys[1]


CORRUPT_FILES = {
    "not JSON": "{'flops_per_s': 1",
    "truncated": '{"x": {"flops_per_s": 1.0, "bytes',
    "not an object": "[1, 2, 3]",
    "not UTF-8": b"\xff\xfe\x00{",
}
GOOD = {"flops_per_s": 5e10, "bytes_per_s": 1e10, "launch_s": 1e-6}
CORRUPT_ENTRIES = {
    "a string": "fast",
    "a list": [5e10, 1e10, 1e-6],
    "missing a field": {"flops_per_s": 5e10, "bytes_per_s": 1e10},
    "an extra field": {**GOOD, "extra": 1.0},
    "a string number": {**GOOD, "flops_per_s": "5e10"},
    "a boolean": {**GOOD, "launch_s": True},
    "zero FLOP/s": {**GOOD, "flops_per_s": 0},
    "negative bytes/s": {**GOOD, "bytes_per_s": -1e10},
    "negative launch": {**GOOD, "launch_s": -1e-6},
    "NaN": {**GOOD, "bytes_per_s": math.nan},
    "infinity": {**GOOD, "flops_per_s": math.inf},
}


@pytest.mark.parametrize("problem", sorted(CORRUPT_FILES) + sorted(CORRUPT_ENTRIES))
def test_a_corrupt_cache_is_remeasured_with_a_warning_naming_the_file(empty_cache, problem):
    path, calls = empty_cache
    roofline.device_profile()  # a valid file first: its one key is this machine's
    (key,) = json.loads(path.read_text())
    roofline._MEASURED.clear()  # a new process
    calls.clear()
    other = {"cpu|another machine|threads1|torch.float32|torch0": GOOD}
    if problem in CORRUPT_FILES:
        content = CORRUPT_FILES[problem]
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    else:
        path.write_text(json.dumps({**other, key: CORRUPT_ENTRIES[problem]}))
    with pytest.warns(RuntimeWarning, match=f"device profile cache {path} is corrupt"):
        profile = roofline.device_profile()
    assert profile == DeviceProfile(1.0, 2.0, 3.0) and len(calls) == 1
    stored = json.loads(path.read_text())  # rewritten: valid, with this machine's new entry
    assert stored[key] == {"flops_per_s": 1.0, "bytes_per_s": 2.0, "launch_s": 3.0}
    if problem in CORRUPT_ENTRIES:
        assert stored == {**other, key: stored[key]}  # other machines' entries are kept
    roofline._MEASURED.clear()  # a new process reads the rewritten file without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert roofline.device_profile() == profile
    assert len(calls) == 1


def test_a_plan_with_a_corrupt_cache_warns_and_does_not_raise(empty_cache):
    path, _ = empty_cache
    path.write_text("{'not': json")
    with pytest.warns(RuntimeWarning, match=str(path)):
        model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
        the_plan = ff.plan(model, torch.randn(4, 256), latent_features=76, progress=False)
    assert len(the_plan.layers) == 2
