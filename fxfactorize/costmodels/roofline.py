"""``cost_model="latency"`` (the default): a roofline of FLOPs and bytes, calibrated on the device.

Each matrix product (a Linear, or a conv seen as im2col × weight) takes
``launch + max(flops / peak_flops, bytes / bandwidth)``; a factorized pair is two such products.
The three device numbers come from micro-benchmarks run once per machine (CPU model or GPU name),
thread count, dtype and torch version, and are cached as JSON in ``$FXFACTORIZE_CACHE_DIR``
(default ``~/.cache/fxfactorize``); ``fxfactorize profile`` shows, re-measures or clears them.
``$FXFACTORIZE_DEVICE_PROFILE="FLOPS,BYTES,LAUNCH"`` (e.g. ``"5e10,1e10,0"``) replaces the
measurement: every machine given the same numbers makes the same plan.

A measured number is only known to within its noise (:data:`PROFILE_NOISE`), so a pair must pay
the margin under every profile within twice that noise of the measured one: a layer whose decision
the noise could flip is kept dense, in every run (see :meth:`RooflineCostModel.pays`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from fxfactorize.costmodels.base import LayerSite, register_cost_model
from fxfactorize.costmodels.timing import best_seconds

__all__ = [
    "PROFILE_ENV",
    "PROFILE_NOISE",
    "DeviceProfile",
    "ProfileSource",
    "RooflineCostModel",
    "clear_profile_cache",
    "device_profile",
    "profile_from_env",
    "profile_cache_file",
    "profile_key",
    "resolve_device_profile",
    "set_device_profile",
]

log = logging.getLogger("fxfactorize")

_MEASURED: dict[str, DeviceProfile] = {}  # this process's profiles, by full key
_PINNED: dict[tuple[str, torch.dtype], DeviceProfile] = {}  # by device type, dtype
PROFILE_ENV = "FXFACTORIZE_DEVICE_PROFILE"
# Each measured number is trusted to ±10 %: the spread of the best-of-N micro-benchmarks between
# fresh processes on one machine (bandwidth and per-call cost, even on a loaded 2-core CPU).
PROFILE_NOISE = 0.1


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


def _valid(flops: float, moved: float, launch: float) -> bool:
    finite = all(math.isfinite(value) for value in (flops, moved, launch))
    return finite and flops > 0 and moved > 0 and launch >= 0


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
    if not _valid(flops, moved, launch):
        raise ValueError(
            f"{PROFILE_ENV} must be 'FLOPS,BYTES,LAUNCH' (two positive numbers and a number >= 0, "
            f"e.g. '5e10,1e10,0'); got {text!r}"
        )
    return DeviceProfile(flops, moved, launch)


def profile_cache_file() -> Path:
    """Where measured profiles are cached: ``$FXFACTORIZE_CACHE_DIR/device_profiles.json``
    (default directory ``~/.cache/fxfactorize``).

    >>> profile_cache_file().name
    'device_profiles.json'
    """
    root = os.environ.get("FXFACTORIZE_CACHE_DIR") or Path.home() / ".cache" / "fxfactorize"
    return Path(root) / "device_profiles.json"


_CPUINFO = Path("/proc/cpuinfo")


def _cpu_name() -> str:
    """The CPU model: ``/proc/cpuinfo``'s "model name" on Linux, else ``platform.processor()``.

    >>> isinstance(_cpu_name(), str) and _cpu_name() != ""
    True
    """
    return _model_name(_CPUINFO) or platform.processor() or platform.machine() or "unknown cpu"


@functools.lru_cache(maxsize=8)  # the key is computed at every cost-model call
def _model_name(cpuinfo: Path) -> str | None:
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return None


def profile_key(device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The cache key of ``device``/``dtype`` on this machine: what its speed depends on.

    The CPU model and thread count for a CPU; the GPU's name and the host CPU (which issues its
    kernel calls) for a GPU; then the dtype and the torch version. Machines that share a home
    directory therefore never read each other's profiles.

    >>> key = profile_key("cpu")
    >>> key.startswith("cpu|") and _cpu_name() in key and "|torch.float32|torch" in key
    True
    """
    kind = torch.device(device).type
    if kind == "cpu":
        names = [_cpu_name(), f"threads{torch.get_num_threads()}"]
    elif kind == "cuda":
        names = [torch.cuda.get_device_name(torch.device(device)), f"host {_cpu_name()}"]
    else:
        names = [f"host {_cpu_name()}"]
    return "|".join([kind, *names, str(dtype), f"torch{torch.__version__}"])


def _measure(device: str, dtype: torch.dtype) -> DeviceProfile:
    """Three micro-benchmarks, well under a second on a CPU (the fastest of several runs each)."""
    options = {"device": device, "dtype": dtype}
    size = 512
    a, b = torch.randn(size, size, **options), torch.randn(size, size, **options)
    flops = 2.0 * size**3 / best_seconds(lambda: a @ b, repeats=7)
    weight = torch.randn(2048, 2048, **options)  # a matrix-vector product streams the weight
    vector = torch.randn(2048, 1, **options)
    streamed = weight.numel() * weight.element_size()
    bandwidth = streamed / best_seconds(lambda: weight @ vector, repeats=7)
    tiny_w, tiny_x = torch.randn(8, 8, **options), torch.randn(1, 8, **options)
    launch = best_seconds(lambda: torch.nn.functional.linear(tiny_x, tiny_w), repeats=30)
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


def _read_cache(path: Path) -> dict:
    """The cache file's entries; an unreadable or corrupt file is reported and read as empty."""
    try:
        cached = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        _warn_corrupt(path, f"{type(error).__name__}: {error}")
        return {}
    if not isinstance(cached, dict):
        _warn_corrupt(path, f"a JSON {type(cached).__name__}, not an object")
        return {}
    return cached


def _from_entry(entry: object) -> DeviceProfile | None:
    """The profile a cache entry holds, or ``None`` if it is not exactly three valid numbers."""
    fields = [field.name for field in dataclasses.fields(DeviceProfile)]
    if not isinstance(entry, dict) or sorted(entry) != sorted(fields):
        return None
    values = [entry[name] for name in fields]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return DeviceProfile(*map(float, values)) if _valid(*values) else None


def _warn_corrupt(path: Path, problem: str) -> None:
    warnings.warn(
        f"device profile cache {path} is corrupt ({problem}); measuring again and rewriting it",
        RuntimeWarning,
        stacklevel=2,
    )


def _store(path: Path, cached: dict, key: str, profile: DeviceProfile) -> None:
    """Write the file's entries ``cached`` with ``profile`` under ``key`` (atomically)."""
    cached = {**cached, key: dataclasses.asdict(profile)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(cached, indent=1))
        os.replace(partial, path)  # a reader never sees a half-written file
    except OSError as error:  # a read-only home must not stop the pass
        log.warning("cannot write the device profile cache %s: %s", path, error)


@dataclasses.dataclass(frozen=True)
class ProfileSource:
    """The profile the latency cost model uses for one device and dtype, and where it came from.

    ``source`` is ``"pinned"`` (:func:`set_device_profile`), ``"environment"``
    (``$FXFACTORIZE_DEVICE_PROFILE``), ``"process"`` (measured earlier in this process),
    ``"cache"`` (read from ``cache_file``) or ``"measured"`` (measured now, stored in ``cache_file``).
    """

    key: str
    profile: DeviceProfile
    source: str
    cache_file: Path


def resolve_device_profile(
    device: str = "cpu", dtype: torch.dtype = torch.float32, *, remeasure: bool = False
) -> ProfileSource:
    """The :class:`ProfileSource` of ``device``/``dtype``: pinned, from the environment, measured
    earlier in this process, cached on disk, or measured now and cached (in that order).

    ``remeasure=True`` measures and stores a fresh profile first (a pinned or environment profile
    still wins). A cache file that is not JSON, or whose entry is not three valid numbers, is
    re-measured and rewritten with a warning naming the file.

    >>> set_device_profile(DeviceProfile(2e11, 4e10, 1e-6))
    >>> found = resolve_device_profile()
    >>> found.source, found.profile.launch_s, found.key == profile_key()
    ('pinned', 1e-06, True)
    >>> set_device_profile(None)
    """
    key, path = profile_key(device, dtype), profile_cache_file()
    if remeasure:
        log.info("measuring %s for the latency cost model (cached in %s)", key, path)
        _MEASURED[key] = _measure(device, dtype)
        _store(path, _read_cache(path), key, _MEASURED[key])
    pin = (torch.device(device).type, dtype)
    if pin in _PINNED:
        return ProfileSource(key, _PINNED[pin], "pinned", path)
    from_env = profile_from_env()
    if from_env is not None:
        return ProfileSource(key, from_env, "environment", path)
    if key in _MEASURED:
        return ProfileSource(key, _MEASURED[key], "measured" if remeasure else "process", path)
    cached = _read_cache(path)
    profile = _from_entry(cached[key]) if key in cached else None
    if profile is not None:
        _MEASURED[key] = profile
        return ProfileSource(key, profile, "cache", path)
    if key in cached:
        _warn_corrupt(path, f"entry {key!r} is not three valid numbers: {cached[key]!r}")
    log.info("measuring %s for the latency cost model (cached in %s)", key, path)
    _MEASURED[key] = _measure(device, dtype)
    _store(path, cached, key, _MEASURED[key])
    return ProfileSource(key, _MEASURED[key], "measured", path)


def device_profile(device: str = "cpu", dtype: torch.dtype = torch.float32) -> DeviceProfile:
    """The :class:`DeviceProfile` of ``device``/``dtype`` (see :func:`resolve_device_profile`).

    >>> set_device_profile(DeviceProfile(2e11, 2e10, 2e-6))
    >>> device_profile().flops_per_s
    200000000000.0
    >>> set_device_profile(None)
    """
    return resolve_device_profile(device, dtype).profile


def clear_profile_cache() -> Path | None:
    """Delete the cache file (every machine's entries: each re-measures on next use) and forget
    this process's measurements; returns the file's path if there was one.

    >>> import os, tempfile
    >>> os.environ["FXFACTORIZE_CACHE_DIR"] = tempfile.mkdtemp()
    >>> clear_profile_cache() is None
    True
    >>> del os.environ["FXFACTORIZE_CACHE_DIR"]
    """
    _MEASURED.clear()
    path = profile_cache_file()
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def _noise_corners(
    profile: DeviceProfile, spread: float, slopes: list[float]
) -> Iterator[DeviceProfile]:
    """The profiles, each number within a factor ``spread`` of ``profile``'s, where a ratio of two
    roofline costs can be largest.

    In ``(1/flops, 1/bytes, launch)`` a cost is linear between the lines where one of its
    products turns from compute- to memory-bound (``bytes_per_s = flops_per_s · slope``, ``slope``
    its bytes per FLOP), so a ratio of two costs is largest at a corner of the box or where such a
    line crosses the box's edge.
    """
    peak, stream = profile.flops_per_s, profile.bytes_per_s
    flops, moved = (peak / spread, peak * spread), (stream / spread, stream * spread)
    points = [(f, b) for f in flops for b in moved]
    for slope in slopes:
        points += [(f, f * slope) for f in flops if moved[0] <= f * slope <= moved[1]]
        points += [(b / slope, b) for b in moved if flops[0] <= b / slope <= flops[1]]
    for launch in (profile.launch_s / spread, profile.launch_s * spread):
        for f, b in points:
            yield DeviceProfile(f, b, launch)


@register_cost_model
class RooflineCostModel:
    """Predicted seconds of the layer at its traced shape; a pair must win by ``margin``, robustly.

    A pair pays when it is predicted at least ``margin`` cheaper under every profile whose three
    numbers are each within a factor ``(1 - noise) ** -2`` of the device's (±23 % for the default
    ``noise`` of 10 %): see :meth:`pays`. ``noise=0`` judges the measured numbers alone.

    >>> from fxfactorize.layers import LayerShape
    >>> model = RooflineCostModel(profile=DeviceProfile(1e11, 1e10, 1e-5))
    >>> site = LayerSite(LayerShape("linear", 2048, 8192, (), 1, positions=64, bias=True))
    >>> model.pays(site, 256), model.pays(site, 1800)
    (True, False)
    """

    name = "latency"
    unit = "s"

    def __init__(
        self,
        margin: float = 0.1,
        profile: DeviceProfile | None = None,
        noise: float = PROFILE_NOISE,
    ) -> None:
        self.margin = margin
        self.profile = profile
        self.noise = noise

    def _profile(self, site: LayerSite) -> DeviceProfile:
        return self.profile or device_profile(site.device, site.dtype)

    @staticmethod
    def _products(site: LayerSite, rank: int | None) -> list[tuple[int, int, int]]:
        """The ``(m, k, n)`` matrix products of one group: one for the layer, two for a pair."""
        layer, m = site.layer, site.layer.positions
        if rank is None and layer.latent is None:
            return [(m, layer.fan_in, layer.out_per_group)]
        per_group = max((layer.latent if rank is None else rank) // layer.groups, 1)
        return [(m, layer.fan_in, per_group), (m, per_group, layer.out_per_group)]

    def _seconds(self, site: LayerSite, rank: int | None, profile: DeviceProfile) -> float:
        size = torch.empty((), dtype=site.dtype).element_size()
        products = self._products(site, rank)
        return site.layer.groups * sum(profile.gemm_seconds(*mkn, size) for mkn in products)

    def cost(self, site: LayerSite, rank: int | None) -> float:
        return self._seconds(site, rank, self._profile(site))

    def worst_ratio(self, site: LayerSite, rank: int, spread: float) -> float:
        """The largest ``cost(site, rank) / cost(site, None)`` under any profile whose three
        numbers are each within a factor ``spread`` of the device's (exact, see ``_noise_corners``).

        >>> from fxfactorize.passes.cost import LayerShape
        >>> model = RooflineCostModel(profile=DeviceProfile(5e10, 1e10, 5e-6))
        >>> site = LayerSite(LayerShape("linear", 256, 256, (), 1, positions=4, bias=True))
        >>> round(model.worst_ratio(site, 76, 1.0), 3), round(model.worst_ratio(site, 76, 1.25), 3)
        (0.831, 0.926)
        """
        size = torch.empty((), dtype=site.dtype).element_size()
        products = self._products(site, rank) + self._products(site, None)
        slopes = [size * (m * k + k * n + m * n) / (2.0 * m * k * n) for m, k, n in products]
        return max(
            self._seconds(site, rank, profile) / self._seconds(site, None, profile)
            for profile in _noise_corners(self._profile(site), spread, slopes)
        )

    def pays(self, site: LayerSite, rank: int) -> bool:
        """Whether the pair at ``rank`` is at least ``margin`` cheaper under every profile within
        ``(1 - noise) ** -2`` of the device's.

        Why twice the noise: a run whose measured profile is off by up to the noise still has the
        true profile within one noise of its own, so any layer that one noise could carry across
        the margin is kept dense in every such run; only pairs that pay with every number one
        noise off against them can be factorized.

        >>> from fxfactorize.passes.cost import LayerShape
        >>> site = LayerSite(LayerShape("linear", 256, 256, (), 1, positions=4, bias=True))
        >>> profile = DeviceProfile(5e10, 1e10, 5e-6)
        >>> RooflineCostModel(profile=profile, noise=0).pays(site, 76)  # 17 % cheaper as measured
        True
        >>> RooflineCostModel(profile=profile).pays(site, 76)  # ... but within the noise band
        False
        """
        spread = (1.0 - self.noise) ** -2
        return self.worst_ratio(site, rank, spread) <= 1.0 - self.margin
