import torch
from hypothesis import HealthCheck, settings

from fxfactorize.conftest import _pinned_device_profile  # noqa: F401  (autouse fixture)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Hypothesis profiles: "ci" (the default) keeps the property suite's time bounded and its draws
# reproducible; "thorough" (`pytest --hypothesis-profile=thorough`) is for local runs: 200 examples
# per property, e.g. 200 drawn models for the no-false-alarm test.
_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=8, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=200, print_blob=True, **_COMMON)
settings.load_profile("ci")
