"""Pairwise tensor contraction in the cheapest order, counted in multiply-adds (MACs).

An expression is a list of *terms* (one tuple of index names per operand) and an output term.
:func:`cheapest_order` searches every pairwise contraction tree (dynamic programming over subsets,
exact up to 10 operands, greedy beyond) and returns its MAC count; :func:`contract` runs it as
batched matrix products (:mod:`.pairwise`), so no intermediate larger than the plan's is ever built.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from fxfactorize.tensorized.pairwise import Contraction, Program, compile_plan, run

__all__ = ["ContractionPlan", "cheapest_order", "contract"]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_EXACT_LIMIT = 10  # 3**10 subset pairs is still fast in Python; beyond that, greedy


class ContractionPlan:
    """A contraction tree: ``steps`` of ``(left, right, result_term)`` and its total ``macs``."""

    def __init__(self, tree: object, macs: int, output: tuple[str, ...], largest: int) -> None:
        self.tree = tree
        self.macs = macs
        self.output = output
        self.largest = largest  # elements of the largest intermediate

    def __repr__(self) -> str:
        return f"ContractionPlan(macs={self.macs}, largest={self.largest})"


def _result(indices: frozenset, outside: frozenset) -> frozenset:
    return indices & outside


@functools.lru_cache(maxsize=512)
def cheapest_order(
    terms: tuple[tuple[str, ...], ...], output: tuple[str, ...], sizes: tuple[tuple[str, int], ...]
) -> ContractionPlan:
    """The pairwise contraction tree with the fewest MACs (ties: smaller intermediates).

    >>> plan = cheapest_order((("b", "i"), ("i", "r"), ("r", "o")), ("b", "o"),
    ...                       (("b", 2), ("i", 100), ("r", 3), ("o", 100)))
    >>> plan.macs  # (x @ A) @ B: 2*100*3 + 2*3*100, never the 100×100 product A @ B
    1200
    """
    size = dict(sizes)
    n = len(terms)
    sets = [frozenset(t) for t in terms]
    out = frozenset(output)
    if n == 1:
        return ContractionPlan(0, math.prod(size[i] for i in sets[0]), output, 0)
    full = (1 << n) - 1
    union: dict[int, frozenset] = {}

    def indices(mask: int) -> frozenset:
        if mask not in union:
            union[mask] = frozenset().union(*(sets[k] for k in range(n) if mask >> k & 1))
        return union[mask]

    def kept(mask: int) -> frozenset:
        return indices(mask) & (out | indices(full ^ mask))

    def numel(index_set: frozenset) -> int:
        return math.prod(size[i] for i in index_set)

    if n <= _EXACT_LIMIT:
        best: dict[int, tuple[int, int, object]] = {1 << k: (0, 0, k) for k in range(n)}
        for mask in sorted(range(1, full + 1), key=lambda m: bin(m).count("1")):
            if mask in best:
                continue
            result = kept(mask)
            choice = None
            sub = (mask - 1) & mask
            while sub:
                rest = mask ^ sub
                if sub < rest and sub in best and rest in best:
                    macs = best[sub][0] + best[rest][0] + numel(indices_of(sub, rest, kept))
                    largest = max(best[sub][1], best[rest][1], numel(result))
                    if choice is None or (macs, largest) < choice[:2]:
                        choice = (macs, largest, (best[sub][2], best[rest][2], mask))
                sub = (sub - 1) & mask
            best[mask] = choice
        macs, largest, tree = best[full]
    else:
        nodes = {1 << k: k for k in range(n)}
        macs = largest = 0
        while len(nodes) > 1:
            pairs = [(a, b) for a in nodes for b in nodes if a < b]
            a, b = min(
                pairs, key=lambda p: (numel(indices_of(p[0], p[1], kept)), numel(kept(p[0] | p[1])))
            )
            macs += numel(indices_of(a, b, kept))
            largest = max(largest, numel(kept(a | b)))
            nodes[a | b] = (nodes.pop(a), nodes.pop(b), a | b)
        tree = nodes[full]
    return ContractionPlan(_label(tree, kept, full, output), macs, output, largest)


def indices_of(left: int, right: int, kept) -> frozenset:
    """Indices touched when contracting the results of two operand subsets."""
    return kept(left) | kept(right)


def _label(tree: object, kept, full: int, output: tuple[str, ...]) -> object:
    """Replace subset masks by the ordered result term of each contraction."""
    if isinstance(tree, int):
        return tree
    left, right, mask = tree
    term = output if mask == full else tuple(sorted(kept(mask)))
    return (_label(left, kept, full, output), _label(right, kept, full, output), term)


def contract(
    operands: Sequence[torch.Tensor],
    terms: Sequence[Sequence[str]],
    output: Sequence[str],
    plan: ContractionPlan | None = None,
) -> torch.Tensor:
    """Contract ``operands`` (labelled by ``terms``) into ``output`` in the cheapest pairwise order.

    >>> a, b, c = torch.randn(2, 5), torch.randn(5, 3), torch.randn(3, 4)
    >>> y = contract([a, b, c], [("b", "i"), ("i", "r"), ("r", "o")], ("b", "o"))
    >>> torch.allclose(y, a @ b @ c, atol=1e-5)
    True
    """
    terms = tuple(tuple(t) for t in terms)
    output = tuple(output)
    if plan is None:
        sizes: dict[str, int] = {}
        for tensor, term in zip(operands, terms, strict=True):
            sizes.update(zip(term, tensor.shape, strict=True))
        plan = cheapest_order(terms, output, tuple(sorted(sizes.items())))
    if isinstance(plan.tree, int) or _is_compiling():
        # under torch.compile: plain einsums, which the compiler traces and fuses without
        # tracing this module's layout planning
        return _einsums(plan, operands, terms, output)
    program = _program(plan, terms, tuple(tuple(t.shape) for t in operands), output)
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return Contraction.apply(program, *operands)
    return run(program, operands)


def _einsums(plan: ContractionPlan, operands, terms: tuple, output: tuple) -> torch.Tensor:
    names = sorted({i for t in terms for i in t} | set(output))
    letter = dict(zip(names, _LETTERS, strict=False))

    def spec(term: tuple[str, ...]) -> str:
        return "".join(letter[i] for i in term)

    def evaluate(node: object) -> tuple[torch.Tensor, tuple[str, ...]]:
        if isinstance(node, int):
            return operands[node], terms[node]
        (x, tx), (y, ty) = evaluate(node[0]), evaluate(node[1])
        return torch.einsum(f"{spec(tx)},{spec(ty)}->{spec(node[2])}", x, y), node[2]

    if isinstance(plan.tree, int):  # a single operand: a permutation / sum
        return torch.einsum(f"{spec(terms[0])}->{spec(output)}", operands[0])
    return evaluate(plan.tree)[0]


_compiler = getattr(torch, "compiler", None)
# torch.compiler.is_compiling exists from torch 2.3; bound once, it is a cheap call per forward
_is_compiling = getattr(_compiler, "is_compiling", None) or (lambda: False)


def _program(plan: ContractionPlan, terms: tuple, shapes: tuple, output: tuple) -> Program:
    """The plan compiled for these operand layouts (cached on the plan)."""
    programs = plan.__dict__.setdefault("programs", {})
    key = (terms, shapes, output)
    if key not in programs:
        programs[key] = compile_plan(plan.tree, terms, shapes, output)
    return programs[key]
