"""`check_equivalence`: does a candidate model compute what the reference does? Hypothesis decides.

First every factorized layer of the candidate is verified from the reference alone (the optimum for
its rank, see :mod:`fxfactorize.optimality`); then Hypothesis draws inputs shaped after the example
inputs (other batch sizes, value distributions, magnitudes, special rows; integer inputs keep their
range), runs both models in eval mode under ``torch.no_grad()`` (the reference with the verified
layers substituted), compares every output leaf by nmse and max abs error, and shrinks any failure
to a small counterexample, raised as :class:`EquivalenceError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import hypothesis
import torch
from hypothesis import HealthCheck
from torch import nn

from fxfactorize.calling import call_model, evaluation_mode
from fxfactorize.input_strategies import describe_inputs, inputs_for, probe_dtypes
from fxfactorize.optimality import verify_layers
from fxfactorize.passes.calibrate import calibration_batches
from fxfactorize.report import REPORT_META

__all__ = [
    "EquivalenceError",
    "Tolerance",
    "UnverifiedLayerError",
    "check_equivalence",
    "compare_outputs",
    "default_tolerance",
]

log = logging.getLogger("fxfactorize")

# Outputs whose nmse is below this agree to about 4 significant digits: float32 round-off of the
# rewritten graph (a different summation order) stays orders of magnitude below it.
EXACT_NMSE = 1e-8
# Per-element slack, relative to the largest reference magnitude, for outputs with ~zero variance.
EXACT_MAX_ABS = 1e-4
# Multiples of the output dtype's machine epsilon allowed as RMS error for float16/bfloat16 outputs.
DTYPE_SLACK = 30.0
# default_tolerance (deprecated) only: a layer counts as truncated when its reported nmse exceeds
# this, and layer errors add up in RMS terms along the graph with this much headroom.
TRUNCATION_NMSE = 1e-10
MARGIN = 10.0


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a candidate's output may be from the reference's, per output tensor.

    An output passes if its ``nmse`` (mean squared error / variance of the reference output) is at
    most ``nmse``, or if every element is within ``max_abs · max(1, max|reference|)`` (for outputs
    with ~zero variance, where nmse means nothing).

    >>> Tolerance(nmse=1e-3).nmse
    0.001
    >>> Tolerance(nmse=-1)
    Traceback (most recent call last):
    ...
    ValueError: Tolerance.nmse must be a number >= 0; got -1
    """

    nmse: float = EXACT_NMSE
    max_abs: float = EXACT_MAX_ABS
    #: widen ``nmse`` to ``(30 · eps)²`` for outputs in a dtype coarser than float32 (float16 and
    #: bfloat16 round-off alone exceeds the float32 default)
    dtype_aware: bool = True

    def nmse_for(self, dtype: torch.dtype) -> float:
        """The nmse limit for an output of ``dtype``.

        >>> Tolerance().nmse_for(torch.float32), round(Tolerance().nmse_for(torch.bfloat16), 3)
        (1e-08, 0.055)
        """
        if not self.dtype_aware or not dtype.is_floating_point:
            return self.nmse
        eps = torch.finfo(dtype).eps
        coarse = eps > torch.finfo(torch.float32).eps
        return max(self.nmse, (DTYPE_SLACK * eps) ** 2) if coarse else self.nmse

    def __post_init__(self) -> None:
        if not isinstance(self.dtype_aware, bool):
            raise ValueError(f"Tolerance.dtype_aware must be a bool; got {self.dtype_aware!r}")
        for name in ("nmse", "max_abs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"Tolerance.{name} must be a number >= 0; got {value!r}")


class EquivalenceError(AssertionError):
    """The candidate disagrees with the reference; the message holds the shrunk falsifying input.

    Attributes: ``inputs`` (the falsifying inputs), ``path`` (the offending output, e.g.
    ``output[1]``), ``nmse`` and ``max_abs`` (its errors; ``nan`` where the candidate raised).
    """

    def __init__(
        self, message: str, inputs: Any = None, path: str = "", nmse: float = math.nan,
        max_abs: float = math.nan,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.inputs, self.path, self.nmse, self.max_abs = inputs, path, nmse, max_abs


class UnverifiedLayerError(EquivalenceError):
    """Some factorized layer of the candidate could not be verified, so equivalence is not shown.

    ``layers`` maps each such layer's qualified name to why (a calibrated layer checked without
    ``calibration=``, a CP layer, no reference layer at its name, ...). Pass the calibration
    batches, or an explicit ``tolerance=Tolerance(...)`` to compare the outputs end to end instead.
    """

    def __init__(self, layers: Mapping[str, str]) -> None:
        self.layers = dict(layers)
        first = next(iter(self.layers))
        lines = [f"- {name!r}: {why}" for name, why in self.layers.items()]
        count = len(self.layers)
        head = (
            f"factorized layer {first!r} could not be verified"
            if count == 1
            else f"{count} factorized layers could not be verified"
        )
        advice = (
            "Pass calibration= (the batches transform was given) to verify calibrated layers, or "
            "tolerance=Tolerance(...) to compare the outputs end to end instead."
        )
        super().__init__(f"{head}:\n" + "\n".join(lines) + "\n" + advice, path=first)


@dataclasses.dataclass
class Mismatch:
    """One output leaf that failed the comparison."""

    path: str
    nmse: float
    max_abs: float
    detail: str


def _leaf_errors(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    ref, cand = reference.detach(), candidate.detach()
    if ref.is_complex() or cand.is_complex():  # real and imaginary parts as two real values
        ref, cand = (
            torch.view_as_real(ref.to(torch.complex128)),
            torch.view_as_real(cand.to(torch.complex128)),
        )
    ref, cand = ref.double(), cand.double()
    both_nonfinite = ~torch.isfinite(ref) & ~torch.isfinite(cand)
    same_special = both_nonfinite & ((ref == cand) | (torch.isnan(ref) & torch.isnan(cand)))
    if bool((~torch.isfinite(ref) ^ ~torch.isfinite(cand)).any()) or not bool(
        same_special[both_nonfinite].all()
    ):
        return math.inf, math.inf
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0, 0.0
    diff = (ref - cand)[finite]
    mse, max_abs = float(diff.pow(2).mean()), float(diff.abs().max())
    variance = float(ref[finite].var(unbiased=False)) if int(finite.sum()) > 1 else 0.0
    nmse = mse / variance if variance > 0 else (0.0 if mse == 0 else math.inf)
    return nmse, max_abs


def _compare_tensors(
    reference: torch.Tensor, candidate: Any, tolerance: Tolerance, path: str
) -> Mismatch | None:
    if not isinstance(candidate, torch.Tensor):
        return Mismatch(path, math.inf, math.inf, f"tensor vs {type(candidate).__name__}")
    if reference.shape != candidate.shape:
        detail = f"shape {tuple(candidate.shape)}, expected {tuple(reference.shape)}"
        return Mismatch(path, math.inf, math.inf, detail)
    if (
        reference.dtype == torch.bool or candidate.dtype == torch.bool
    ):  # exactly, element by element
        if reference.dtype != candidate.dtype:
            return Mismatch(path, math.inf, math.inf, f"dtype {candidate.dtype}, expected bool")
        differ = int((reference != candidate).sum())
        detail = f"{differ} of {reference.numel()} bool elements differ"
        return None if differ == 0 else Mismatch(path, math.inf, 1.0, detail)
    nmse, max_abs = _leaf_errors(reference, candidate)
    magnitude = reference.detach().abs().double().nan_to_num(0.0, 0.0, 0.0)
    scale = float(magnitude.max()) if reference.numel() else 0.0
    limit = tolerance.nmse_for(reference.dtype)
    if nmse <= limit or max_abs <= tolerance.max_abs * max(1.0, scale):
        return None
    return Mismatch(path, nmse, max_abs, f"nmse {nmse:.3g} > {limit:.3g}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, complex)) and not isinstance(value, bool)


def _compare_numbers(
    reference: Any, candidate: Any, tolerance: Tolerance, path: str
) -> Mismatch | None:
    """Python numbers as one-element float64 tensors: NaN equals NaN, the rest under tolerance."""
    if not _is_number(candidate):
        return Mismatch(path, math.inf, math.inf, f"{candidate!r} != {reference!r}")
    if reference == candidate:
        return None
    dtype = (
        torch.complex128
        if isinstance(reference, complex) or isinstance(candidate, complex)
        else torch.float64
    )
    try:
        ref, cand = torch.tensor(reference, dtype=dtype), torch.tensor(candidate, dtype=dtype)
    except (OverflowError, RuntimeError):  # ints beyond float64: equal or not
        return Mismatch(path, math.inf, math.inf, f"{candidate!r} != {reference!r}")
    mismatch = _compare_tensors(ref, cand, tolerance, path)
    if mismatch is not None:
        mismatch.detail = f"{candidate!r} vs {reference!r} ({mismatch.detail})"
    return mismatch


def _numpy_leaf(value: Any) -> Any:
    """A numpy array as a tensor (numeric and bool dtypes), a numpy scalar as a Python one."""
    numpy = sys.modules.get("numpy")
    if numpy is None:  # nothing can be a numpy array
        return value
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, numpy.ndarray):
        try:
            return torch.as_tensor(value)
        except (TypeError, RuntimeError, ValueError):  # strings, objects: compared as arrays
            return value
    return value


def _equal(reference: Any, candidate: Any) -> bool:
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(reference, numpy.ndarray):
        return isinstance(candidate, numpy.ndarray) and bool(
            numpy.array_equal(reference, candidate)
        )
    try:
        return bool(reference == candidate)
    except Exception:  # an == that does not give one truth value
        return reference is candidate


def _children(
    reference: Any, candidate: Any, path: str
) -> list[tuple[str, Any, Any]] | Mismatch | None:
    """The ``(path, reference, candidate)`` pairs inside a container, a structural mismatch, or
    ``None`` for a leaf."""
    if dataclasses.is_dataclass(reference) and not isinstance(reference, type):
        if type(candidate) is not type(reference):
            detail = f"{type(candidate).__name__} vs {type(reference).__name__}"
            return Mismatch(path, math.inf, math.inf, detail)
        return [
            (f"{path}.{f.name}", getattr(reference, f.name), getattr(candidate, f.name))
            for f in dataclasses.fields(reference)
        ]
    if isinstance(reference, Mapping):
        if not isinstance(candidate, Mapping) or list(candidate) != list(reference):
            got = list(candidate) if isinstance(candidate, Mapping) else type(candidate).__name__
            return Mismatch(path, math.inf, math.inf, f"keys {got}, expected {list(reference)}")
        return [(f"{path}[{key!r}]", reference[key], candidate[key]) for key in reference]
    if isinstance(reference, (tuple, list)):
        if not isinstance(candidate, (tuple, list)) or len(candidate) != len(reference):
            kind = type(reference).__name__
            detail = f"{candidate!r:.60} does not match a {kind} of {len(reference)}"
            return Mismatch(path, math.inf, math.inf, detail)
        return [
            (f"{path}[{i}]", r, c)
            for i, (r, c) in enumerate(zip(reference, candidate, strict=True))
        ]
    return None


def compare_outputs(
    reference: Any, candidate: Any, tolerance: Tolerance, path: str = "output"
) -> Mismatch | None:
    """The first output leaf where ``candidate`` is out of ``tolerance``, or ``None``.

    Walks tensors, tuples, lists, dicts (including ``ModelOutput``-style mappings) and dataclasses.
    Float tensors compare by nmse / max abs error (complex ones by their real and imaginary parts;
    NaN and ±inf must sit at the same places), bool tensors element by element, numpy arrays as
    tensors, Python numbers as one-element float64 tensors (so ``1.0`` and ``1.0 + 1e-7`` agree
    and NaN equals NaN); other leaves must be equal.

    >>> a = (torch.ones(3), {"x": torch.arange(4.0)})
    >>> b = (torch.ones(3), {"x": torch.arange(4.0) + 1})
    >>> compare_outputs(a, b, Tolerance()).path
    "output[1]['x']"
    >>> compare_outputs(a, a, Tolerance()) is None
    True
    >>> compare_outputs((1.0, float("nan")), (1.0 + 1e-7, float("nan")), Tolerance()) is None
    True
    >>> compare_outputs(torch.tensor([True, False]), torch.tensor([True, True]), Tolerance()).detail
    '1 of 2 bool elements differ'
    """
    reference, candidate = _numpy_leaf(reference), _numpy_leaf(candidate)
    if isinstance(reference, torch.Tensor):
        return _compare_tensors(reference, candidate, tolerance, path)
    if _is_number(reference):
        return _compare_numbers(reference, candidate, tolerance, path)
    pairs = _children(reference, candidate, path)
    if pairs is None:
        if _equal(reference, candidate):
            return None
        return Mismatch(path, math.inf, math.inf, f"{candidate!r:.60} != {reference!r:.60}")
    if isinstance(pairs, Mismatch):
        return pairs
    for sub_path, ref, cand in pairs:
        mismatch = compare_outputs(ref, cand, tolerance, sub_path)
        if mismatch is not None:
            return mismatch
    return None


def _report_of(candidate: nn.Module) -> Any:
    meta = getattr(candidate, "meta", None)
    return meta.get(REPORT_META) if isinstance(meta, dict) else None


def default_tolerance(candidate: nn.Module) -> Tolerance:
    """Deprecated: the end-to-end tolerance implied by ``candidate``'s own report.

    Exact-ish (:data:`EXACT_NMSE`) unless ``candidate.meta["fxfactorize"]`` reports a truncated
    layer; then ``MARGIN · (Σ_l √nmse_l)²`` over the reported per-layer errors. It believes what
    the candidate says about itself, so :func:`check_equivalence` no longer uses it (it verifies
    each layer from the reference instead); pass an explicit :class:`Tolerance` of your own.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     tolerance = default_tolerance(nn.Linear(2, 2))
    >>> tolerance.nmse, caught[0].category.__name__
    (1e-08, 'DeprecationWarning')
    """
    warnings.warn(
        "default_tolerance reads the candidate's own report, which check_equivalence no longer "
        "trusts; it will be removed. Pass an explicit Tolerance instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    report = _report_of(candidate)
    layers = [] if report is None else report.layers
    truncated = [r for r in layers if r.factorized and (r.nmse or 0.0) > TRUNCATION_NMSE]
    if not truncated:
        return Tolerance()
    return Tolerance(nmse=EXACT_NMSE + MARGIN * sum(math.sqrt(r.nmse) for r in truncated) ** 2)


def _verified_substitutes(
    reference: nn.Module, candidate: nn.Module, calibration: Any
) -> dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """``{reference layer: substitute}`` for every factorized layer of ``candidate``, each verified
    optimal for its rank (see :mod:`fxfactorize.optimality`); raise where one is not."""
    with _evaluating(reference):
        verdicts = verify_layers(reference, candidate, calibration, call_model)
    for verdict in verdicts:
        if verdict.status == "fault":
            raise EquivalenceError(
                f"factorized layer {verdict.name!r} is not the optimum for its rank: "
                f"{verdict.detail}",
                path=verdict.name,
                nmse=verdict.excess,
            )
    unverified = {v.name: v.detail for v in verdicts if v.status == "unverifiable"}
    if unverified:
        raise UnverifiedLayerError(unverified)
    for verdict in verdicts:
        log.debug("layer %s: %s %s (%s)", verdict.name, verdict.status, verdict.how, verdict.detail)
    return {v.reference: v.substitute for v in verdicts if v.status == "verified"}


@contextlib.contextmanager
def _substituted(substitutes: Mapping[nn.Module, Callable]) -> Iterator[None]:
    """While active, each reference layer in ``substitutes`` returns what its substitute computes.

    The reference then runs its own graph with the candidate's verified layers in place (each
    rebuilt from the candidate's parameters alone): the candidate must match that exactly, so a
    fault anywhere else, or in what a candidate layer does beyond its parameters, shows.
    """

    def hook_for(substitute: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return substitute(args[0] if args else next(iter(kwargs.values())))

        return hook

    handles = [
        layer.register_forward_hook(hook_for(substitute), with_kwargs=True)
        for layer, substitute in substitutes.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd while the check runs the models."""
    with evaluation_mode(*modules), torch.no_grad():
        yield


def _validate(
    reference: Any,
    candidate: Any,
    max_examples: Any,
    seed: Any,
    batch_dim: Any,
    tolerance: Any,
    calibration: Any,
) -> None:
    for name, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be an int >= 1; got {max_examples!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None; got {seed!r}")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise ValueError(f"batch_dim must be an int >= 0; got {batch_dim!r}")
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        raise TypeError(f"tolerance must be a Tolerance or None; got {type(tolerance).__name__}")
    if tolerance is not None and calibration is not None:
        raise ValueError(
            "pass calibration= (verify each layer, then compare exactly) or tolerance= (compare "
            "the outputs end to end within it), not both"
        )


def check_equivalence(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    tolerance: Tolerance | None = None,
    calibration: Any = None,
    max_examples: int = 50,
    seed: int | None = None,
    batch_dim: int = 0,
) -> None:
    """Raise :class:`EquivalenceError` unless ``candidate`` computes what ``reference`` does.

    Nothing the candidate says about itself is read (not its report, not ``meta``). Without a
    ``tolerance`` the check has two parts:

    1. Every factorized layer of ``candidate`` (found by type: the rank-r pairs and the tensorized
       Linear) is checked against the reference's layer at the same qualified name, from their
       parameters: it must be the optimum for its rank (read from its weights' shapes). Data-free:
       its weight error is the spectrum tail of the reference weight and its bias is the
       reference's. Calibrated (needs ``calibration``, the batches given to ``transform``, in the
       same forms: an iterable of tensors, tuples or dicts): its output error on the inputs the
       reference layer receives from them, bias included, is the reduced-rank-regression optimum.
       TT / Tucker layers: within the TT-SVD / HOSVD bound of their ranks. Bounds and their
       rounding slack are in :mod:`fxfactorize.optimality`. A layer that misses its bound raises
       :class:`EquivalenceError`; one that cannot be verified (calibrated without
       ``calibration``, CP, no reference layer at its name such as one made from a functional
       call) raises :class:`UnverifiedLayerError`, never a silent pass.
    2. The reference is run with those layers substituted (each rebuilt from the candidate's
       parameters) and the candidate must match it exactly (nmse ≤ 1e-8, float32 round-off) on
       Hypothesis-drawn inputs: anything else that changed shows, however lossy the layers.

    With an explicit ``tolerance`` the layers are not checked: the candidate is compared with the
    reference directly, within that tolerance (``calibration`` may not be given too).

    Hypothesis draws up to ``max_examples`` inputs shaped after ``example_inputs`` (a tensor, a tuple
    of positional inputs or a dict of keyword inputs): batch sizes from 1 to beyond the example's
    along ``batch_dim``, normal/uniform/heavy-tailed/constant values, magnitudes from 1e-3 to 1e3
    times the example's, all-zero rows, and float32 / float64 / the example's dtype where both
    models accept it; integer and bool inputs keep the example's value range. Both models run in
    eval mode under ``torch.no_grad()`` (their modes are restored); neither is changed. A failing
    input is shrunk, and the error names its shapes, the offending output path
    (``output[1]['logits']``) and its nmse / max abs error. ``seed`` makes the draw deterministic;
    a drawn input on which the reference itself raises is discarded. Called inside a ``@given``
    test, the inputs are drawn from that test's data (no nested search; ``seed`` is then ignored),
    so Hypothesis shrinks the model and the inputs together.

    >>> import copy, fxfactorize as ff
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> gm = ff.transform(model, torch.randn(3, 16), min_features=1, latent_features=4,
    ...                   cost_model="macs", progress=False)
    >>> check_equivalence(model, gm, torch.randn(3, 16), max_examples=10, seed=0)
    >>> broken = copy.deepcopy(gm)
    >>> _ = broken.get_submodule("0").module1.bias.data.add_(1.0)
    >>> check_equivalence(model, broken, torch.randn(3, 16), max_examples=10, seed=0)
    Traceback (most recent call last):
    ...
    fxfactorize.equivalence.UnverifiedLayerError: factorized layer '0' could not be verified:...
    """
    _validate(reference, candidate, max_examples, seed, batch_dim, tolerance, calibration)
    if tolerance is None:
        batches = None if calibration is None else calibration_batches(calibration)
        substitutes = _verified_substitutes(reference, candidate, batches)
    else:
        substitutes = {}
    nested = hypothesis.currently_in_test_context()
    comparison = _Comparison(reference, candidate, substitutes, tolerance or Tolerance(), nested)
    _compare_end_to_end(comparison, example_inputs, max_examples, seed, batch_dim)


@dataclasses.dataclass
class _Comparison:
    """``candidate`` against ``reference`` (run with ``substitutes``) on one input at a time."""

    reference: nn.Module
    candidate: nn.Module
    substitutes: Mapping[nn.Module, Callable]
    tolerance: Tolerance
    nested: bool
    rejected: int = 0

    def failure(self, inputs: Any, drawn: bool = True) -> Mismatch | None:
        """The first output out of tolerance on ``inputs``; a drawn input on which the reference
        raises is rejected (skipped inside a caller's ``@given`` test)."""
        with _evaluating(self.reference, self.candidate):
            try:
                with _substituted(self.substitutes):
                    expected = call_model(self.reference, inputs)
            except Exception:
                if not drawn:
                    raise  # the caller's own example must run: let them see why it does not
                self.rejected += 1
                if self.nested:  # skip it: rejecting would discard the caller's whole example
                    return None
                hypothesis.reject()  # inputs the reference itself refuses say nothing
            try:
                got = call_model(self.candidate, inputs)
            except Exception as error:  # a candidate that raises where the reference did not fails
                detail = f"candidate raised {type(error).__name__}: {error}"
                return Mismatch("output", math.nan, math.nan, detail)
        return compare_outputs(expected, got, self.tolerance)

    def check(self, inputs: Any, drawn: bool = True) -> None:
        mismatch = self.failure(inputs, drawn)
        if mismatch is not None:
            _raise(inputs, mismatch, self.tolerance)


def _compare_end_to_end(
    comparison: _Comparison,
    example_inputs: Any,
    max_examples: int,
    seed: int | None,
    batch_dim: int,
) -> None:
    """Hypothesis searches for an input where the comparison fails; raise
    :class:`EquivalenceError` with the shrunk one."""
    comparison.check(example_inputs, drawn=False)  # a plain failure there needs no search
    accepted = probe_dtypes(comparison.candidate, example_inputs, call_model)
    dtypes = [
        d for d in probe_dtypes(comparison.reference, example_inputs, call_model) if d in accepted
    ]
    strategy = inputs_for(example_inputs, batch_dim=batch_dim, dtypes=dtypes)
    if comparison.nested:
        # Inside a @given test: draw from the caller's data instead of starting a nested search,
        # so Hypothesis shrinks the caller's example and these inputs together.
        data = hypothesis.control.current_build_context().data
        for _ in range(max_examples):
            comparison.check(data.draw(strategy))
        return
    settings = hypothesis.settings(
        hypothesis.settings.default,
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    try:
        counterexample = hypothesis.find(
            strategy,
            lambda inputs: comparison.failure(inputs) is not None,
            settings=settings,
            random=None if seed is None else random.Random(seed),
        )
    except hypothesis.errors.NoSuchExample:
        return
    except hypothesis.errors.Unsatisfiable as error:
        raise ValueError(
            f"the reference model raised on every drawn input ({comparison.rejected} tried); "
            f"check that batch_dim={batch_dim} is the batch dimension of example_inputs"
        ) from error
    _raise(counterexample, comparison.failure(counterexample, drawn=False), comparison.tolerance)


def _raise(inputs: Any, mismatch: Mismatch | None, tolerance: Tolerance) -> None:
    if mismatch is None:  # flaky: the shrunk input passes on re-run
        raise EquivalenceError(
            f"candidate differs from reference only intermittently on {describe_inputs(inputs)}",
            inputs,
        )
    raise EquivalenceError(
        f"candidate differs from reference at {mismatch.path}: {mismatch.detail} "
        f"(nmse {mismatch.nmse:.3g}, max abs error {mismatch.max_abs:.3g}; tolerance nmse "
        f"{tolerance.nmse:.3g}, max_abs {tolerance.max_abs:.3g})\n"
        f"falsifying input: {describe_inputs(inputs)}",
        inputs, mismatch.path, mismatch.nmse, mismatch.max_abs,
    )  # fmt: skip
