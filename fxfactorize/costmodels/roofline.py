"""``cost_model="latency"`` (the default): a roofline of FLOPs and bytes, calibrated on the device.

Each matrix product (a Linear, or a conv seen as im2col × weight) takes
``launch + max(flops / peak_flops, bytes / bandwidth)``; a factorized pair is two such products.
The three device numbers come from micro-benchmarks run once per device, dtype and thread count,
and are cached as JSON in ``$FXFACTORIZE_CACHE_DIR`` (default ``~/.cache/fxfactorize``).
``$FXFACTORIZE_DEVICE_PROFILE="FLOPS,BYTES,LAUNCH"`` (e.g. ``"5e10,1e10,0"``) replaces the
measurement: every machine given the same numbers makes the same plan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
from pathlib import Path

import torch

from fxfactorize.costmodels.base import LayerSite, register_cost_model
from fxfactorize.costmodels.timing import median_seconds

__all__ = [
    "PROFILE_ENV",
    "DeviceProfile",
    "RooflineCostModel",
    "device_profile",
    "profile_from_env",
    "set_device_profile",
]

log = logging.getLogger("fxfactorize")

_MEASURED: dict[str, DeviceProfile] = {}  # this process's profiles, by full key
_PINNED: dict[tuple[str, torch.dtype], DeviceProfile] = {}  # by device type, dtype
PROFILE_ENV = "FXFACTORIZE_DEVICE_PROFILE"


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Throughput of a device: FLOP/s of a large matrix product, bytes/s streamed, seconds per call.

    >>> DeviceProfile(1e11, 1e10, 1e-5).gemm_seconds(64, 2048, 8192, 4) > 1e-5
    True
    """

    flops_per_s: float
    bytes_per_s: float
    launch_s: float

    def gemm_seconds(self, m: int, k: int, n: int, element_size: int) -> float:
        """Predicted time of an ``[m, k] @ [k, n]`` product."""
        flops = 2.0 * m * k * n
        moved = element_size * (m * k + k * n + m * n)
        return self.launch_s + max(flops / self.flops_per_s, moved / self.bytes_per_s)


def profile_from_env() -> DeviceProfile | None:
    """The profile ``$FXFACTORIZE_DEVICE_PROFILE`` gives (``"FLOPS,BYTES,LAUNCH"``), or ``None``.

    >>> import os
    >>> os.environ[PROFILE_ENV] = "2e11,4e10,1e-6"
    >>> profile_from_env()
    DeviceProfile(flops_per_s=200000000000.0, bytes_per_s=40000000000.0, launch_s=1e-06)
    >>> os.environ[PROFILE_ENV] = "fast"
    >>> profile_from_env()
    Traceback (most recent call last):
    ...
    ValueError: FXFACTORIZE_DEVICE_PROFILE must be 'FLOPS,BYTES,LAUNCH' (two positive numbers and a number >= 0, e.g. '5e10,1e10,0'); got 'fast'
    >>> del os.environ[PROFILE_ENV]
    """
    text = os.environ.get(PROFILE_ENV, "").strip()
    if not text:
        return None
    try:
        flops, moved, launch = (float(part) for part in text.split(","))
    except ValueError:
        flops = moved = launch = math.nan
    if not (flops > 0 and moved > 0 and launch >= 0 and math.isfinite(flops * moved * launch)):
        raise ValueError(
            f"{PROFILE_ENV} must be 'FLOPS,BYTES,LAUNCH' (two positive numbers and a number >= 0, "
            f"e.g. '5e10,1e10,0'); got {text!r}"
        )
    return DeviceProfile(flops, moved, launch)


def _cache_file() -> Path:
    root = os.environ.get("FXFACTORIZE_CACHE_DIR") or Path.home() / ".cache" / "fxfactorize"
    return Path(root) / "device_profiles.json"


def _key(device: str, dtype: torch.dtype) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
    else:  # a CPU's speed depends on its thread count as much as on the chip
        name = (
            f"{platform.machine()}-{platform.processor() or 'cpu'}-threads{torch.get_num_threads()}"
        )
    return f"{kind}|{name}|{dtype}|torch{torch.__version__}"


def _measure(device: str, dtype: torch.dtype) -> DeviceProfile:
    """Three micro-benchmarks, well under a second on a CPU."""
    options = {"device": device, "dtype": dtype}
    size = 512
    a, b = torch.randn(size, size, **options), torch.randn(size, size, **options)
    flops = 2.0 * size**3 / median_seconds(lambda: a @ b, repeats=5)
    weight = torch.randn(2048, 2048, **options)  # a matrix-vector product streams the weight
    vector = torch.randn(2048, 1, **options)
    streamed = weight.numel() * weight.element_size()
    bandwidth = streamed / median_seconds(lambda: weight @ vector, repeats=5)
    tiny_w, tiny_x = torch.randn(8, 8, **options), torch.randn(1, 8, **options)
    launch = median_seconds(lambda: torch.nn.functional.linear(tiny_x, tiny_w), repeats=20)
    return DeviceProfile(flops, bandwidth, launch)


def set_device_profile(
    profile: DeviceProfile | None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> None:
    """Pin the profile used for ``device``/``dtype`` (``None`` unpins); for tests and for reuse.

    >>> set_device_profile(DeviceProfile(1e11, 1e10, 1e-5))
    >>> device_profile().launch_s
    1e-05
    >>> set_device_profile(None)
    """
    key = (torch.device(device).type, dtype)
    if profile is None:
        _PINNED.pop(key, None)
    else:
        _PINNED[key] = profile


def device_profile(device: str = "cpu", dtype: torch.dtype = torch.float32) -> DeviceProfile:
    """The :class:`DeviceProfile` of ``device``/``dtype``: pinned, from the environment, cached on
    disk, or measured now (in that order).

    >>> set_device_profile(DeviceProfile(2e11, 2e10, 2e-6))
    >>> device_profile().flops_per_s
    200000000000.0
    >>> set_device_profile(None)
    """
    pin = (torch.device(device).type, dtype)
    if pin in _PINNED:
        return _PINNED[pin]
    from_env = profile_from_env()
    if from_env is not None:
        return from_env
    key = _key(device, dtype)
    if key in _MEASURED:
        return _MEASURED[key]
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        profile = DeviceProfile(**cached[key])
    else:
        log.info("measuring %s for the latency cost model (cached in %s)", key, path)
        profile = _measure(device, dtype)
        cached[key] = dataclasses.asdict(profile)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=1))
        except OSError as error:  # a read-only home must not stop the pass
            log.warning("cannot write the device profile cache %s: %s", path, error)
    _MEASURED[key] = profile
    return profile


@register_cost_model
class RooflineCostModel:
    """Predicted seconds of the layer at its traced shape; a pair must win by ``margin``.

    >>> from fxfactorize.layers import LayerShape
    >>> model = RooflineCostModel(profile=DeviceProfile(1e11, 1e10, 1e-5))
    >>> site = LayerSite(LayerShape("linear", 2048, 8192, (), 1, positions=64, bias=True))
    >>> model.pays(site, 256), model.pays(site, 1800)
    (True, False)
    """

    name = "latency"
    unit = "s"

    def __init__(self, margin: float = 0.1, profile: DeviceProfile | None = None) -> None:
        self.margin = margin
        self.profile = profile

    def _profile(self, site: LayerSite) -> DeviceProfile:
        return self.profile or device_profile(site.device, site.dtype)

    def cost(self, site: LayerSite, rank: int | None) -> float:
        layer, profile = site.layer, self._profile(site)
        size = torch.empty((), dtype=site.dtype).element_size()
        m = layer.positions
        if rank is None and layer.latent is None:
            return layer.groups * profile.gemm_seconds(m, layer.fan_in, layer.out_per_group, size)
        rank = layer.latent if rank is None else rank
        per_group = max(rank // layer.groups, 1)
        first = profile.gemm_seconds(m, layer.fan_in, per_group, size)
        second = profile.gemm_seconds(m, per_group, layer.out_per_group, size)
        return layer.groups * (first + second)

    def pays(self, site: LayerSite, rank: int) -> bool:
        return self.cost(site, rank) <= (1.0 - self.margin) * self.cost(site, None)
