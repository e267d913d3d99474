"""A contraction plan run as batched matrix products, with a backward that is one graph node.

Each pairwise step of a :class:`~fxfactorize.tensorized.contract.ContractionPlan` becomes
``bmm(left viewed [batch, kept, contracted], right viewed [batch, contracted, kept])``; every
intermediate keeps the ``(batch, left kept, right kept)`` order the product leaves it in, so only
operands whose layout does not already fit are copied. With autograd, :class:`Contraction` is a
single node whose backward runs two ``bmm`` per step on the saved step operands, instead of the
dozens of permute / view / unsqueeze nodes ``torch.einsum`` records per step (at 256×256 layers
those nodes cost more than the arithmetic).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

__all__ = ["Contraction", "Program", "compile_plan", "run"]

_SKINNY = 16  # products with fewer output columns than this run faster transposed (measured)


@dataclasses.dataclass(frozen=True)
class _Side:
    """How one operand of a step becomes a ``[batch, rows, cols]`` matrix stack."""

    slot: int
    summed: tuple[int, ...]  # dims summed away first (indices no other operand or output has)
    shape: torch.Size | tuple[int, ...]  # the operand's shape after the sum
    permutation: tuple[int, ...]
    transposed: bool  # viewed as [batch, cols, rows] and transposed: no copy needed
    matrix: tuple[int, int, int]  # [batch, rows, cols] as the product consumes it
    original: tuple[int, ...]  # the operand's shape before the sum

    # derived once here: the forward and backward of tiny layers are bound by per-call overhead
    @functools.cached_property
    def identity(self) -> bool:
        return self.permutation == tuple(range(len(self.permutation)))

    @functools.cached_property
    def permuted_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[k] for k in self.permutation)

    @functools.cached_property
    def inverse(self) -> tuple[int, ...]:
        return tuple(self.permutation.index(k) for k in range(len(self.permutation)))


@dataclasses.dataclass(frozen=True)
class _Step:
    left: _Side
    right: _Side
    result_shape: tuple[int, ...]
    swapped: bool  # the result is stored [batch, right kept, left kept]: see _product


@dataclasses.dataclass(frozen=True)
class Program:
    """Steps over numbered slots (operands first, then each step's result, in order)."""

    steps: tuple[_Step, ...]
    n_operands: int
    output_permutation: tuple[int, ...]  # from the last result's order to the requested output


def _side(
    slot: int,
    term: tuple[str, ...],
    shape: tuple[int, ...],
    batch: list[str],
    contracted: list[str],
    kept: list[str],
    keep_set: set[str],
    is_left: bool,
) -> _Side:
    summed = tuple(k for k, i in enumerate(term) if i not in keep_set)
    reduced = tuple(i for i in term if i in keep_set)
    reduced_shape = tuple(n for i, n in zip(term, shape, strict=True) if i in keep_set)
    size = dict(zip(reduced, reduced_shape, strict=True))
    nb = math.prod(size[i] for i in batch)
    nk = math.prod(size[i] for i in contracted)
    nkept = math.prod(size[i] for i in kept)
    # left is [batch, kept, contracted] and right [batch, contracted, kept]; the other order of
    # the last two is as good (bmm takes a transposed view) when the operand is already in it
    natural = batch + kept + contracted if is_left else batch + contracted + kept
    swapped = batch + contracted + kept if is_left else batch + kept + contracted
    transposed = tuple(swapped) == reduced and tuple(natural) != reduced
    order = swapped if transposed else natural
    permutation = tuple(reduced.index(i) for i in order)
    rows, cols = (nkept, nk) if is_left else (nk, nkept)
    return _Side(
        slot, summed, reduced_shape, permutation, transposed, (nb, rows, cols), tuple(shape)
    )


def compile_plan(
    tree: object,
    terms: Sequence[tuple[str, ...]],
    shapes: Sequence[tuple[int, ...]],
    output: tuple[str, ...],
) -> Program:
    """Turn a contraction tree (nested ``(left, right, term)`` over operand indices) into steps.

    >>> p = compile_plan((0, 1, ("b", "o")), [("b", "i"), ("i", "o")], [(2, 3), (3, 4)], ("b", "o"))
    >>> len(p.steps), p.steps[0].left.matrix, p.steps[0].right.matrix
    (1, (1, 2, 3), (1, 3, 4))
    """
    slot_terms = [tuple(t) for t in terms]
    slot_shapes = [tuple(s) for s in shapes]
    size: dict[str, int] = {}
    for term, shape in zip(slot_terms, slot_shapes, strict=True):
        size.update(zip(term, shape, strict=True))
    steps: list[_Step] = []

    def indices(node: object) -> set[str]:
        return set(slot_terms[node]) if isinstance(node, int) else set(node[2])

    def walk(node: object, desired: tuple[str, ...]) -> int:
        """Compile ``node`` so that its result comes out in ``desired`` order where it can: each
        step lays its operands out the way it consumes them, so only leaves get permuted."""
        if isinstance(node, int):
            return node
        left_node, right_node, term = node
        set_a, set_b, wanted = indices(left_node), indices(right_node), set(term)
        shared = set_a & set_b
        batch = [i for i in desired if i in shared]
        left_kept = [i for i in desired if i in set_a - shared]
        right_kept = [i for i in desired if i in set_b - shared]
        leaf = next((n for n in (left_node, right_node) if isinstance(n, int)), None)
        reference = slot_terms[leaf] if leaf is not None else sorted(shared)
        contracted = [i for i in reference if i in shared and i not in wanted]
        a = walk(left_node, tuple(batch + left_kept + contracted))
        b = walk(right_node, tuple(batch + contracted + right_kept))
        ta, tb = slot_terms[a], slot_terms[b]
        keep_a = set(batch) | set(contracted) | set(left_kept)
        keep_b = set(batch) | set(contracted) | set(right_kept)
        left = _side(a, ta, slot_shapes[a], batch, contracted, left_kept, keep_a, True)
        right = _side(b, tb, slot_shapes[b], batch, contracted, right_kept, keep_b, False)
        natural, swapped_term = batch + left_kept + right_kept, batch + right_kept + left_kept
        swapped = _swap(desired, batch, natural, swapped_term, left.matrix[1], right.matrix[2])
        result_term = tuple(swapped_term if swapped else natural)
        result_shape = tuple(size[i] for i in result_term)
        steps.append(_Step(left, right, result_shape, swapped))
        slot_terms.append(result_term)
        slot_shapes.append(result_shape)
        return len(slot_terms) - 1

    last = walk(tree, tuple(output))
    final = slot_terms[last]
    if sorted(final) != sorted(output):
        raise ValueError(f"the plan produces {final}, not the requested output {output}")
    return Program(tuple(steps), len(terms), tuple(final.index(i) for i in output))


def _swap(desired, batch, natural, swapped, rows: int, cols: int) -> bool:
    """Whether a step stores its result ``[batch, right kept, left kept]``: when that is the order
    its consumer wants, else when it starts like that order, else for a skinny product."""
    for candidate, is_swapped in ((natural, False), (swapped, True)):
        if tuple(candidate) == desired:
            return is_swapped
    head = len(batch)
    if head < len(desired):
        for candidate, is_swapped in ((natural, False), (swapped, True)):
            if candidate[head] == desired[head]:
                return is_swapped
    return cols < min(rows, _SKINNY)


def _matrix(tensor: torch.Tensor, side: _Side) -> torch.Tensor:
    if side.summed:
        tensor = tensor.sum(side.summed)
    if not side.identity:
        tensor = tensor.permute(side.permutation)
    nb, rows, cols = side.matrix
    if side.transposed:
        return tensor.reshape(nb, cols, rows).transpose(1, 2)
    return tensor.reshape(nb, rows, cols)


def _unmatrix(gradient: torch.Tensor, side: _Side) -> torch.Tensor:
    """Map a ``[batch, rows, cols]`` gradient back to the operand's own layout."""
    if side.transposed:
        gradient = gradient.transpose(1, 2)
    gradient = gradient.reshape(side.permuted_shape)
    if not side.identity:
        gradient = gradient.permute(side.inverse)
    if side.summed:
        for dim in side.summed:
            gradient = gradient.unsqueeze(dim)
        gradient = gradient.expand(side.original)
    return gradient


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bmm(a, b)`` (``[B, M, K] @ [B, K, N]``), each shape by its fastest CPU route (measured:
    oneDNN runs a tall-skinny product 3× faster transposed, and outer products or matrix-vector
    stacks faster as broadcast multiplies than as a batched GEMM)."""
    if a.shape[2] == 1:
        return a * b
    if b.shape[2] == 1:
        return (a * b.transpose(1, 2)).sum(2, keepdim=True)
    if a.shape[1] == 1:
        return (a.transpose(1, 2) * b).sum(1, keepdim=True)
    if b.shape[2] < min(a.shape[1], _SKINNY):  # fill the long side along the contiguous rows
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


def _forward(program: Program, operands: Sequence[torch.Tensor]):
    slots = list(operands)
    matrices = []
    for step in program.steps:
        left = _matrix(slots[step.left.slot], step.left)
        right = _matrix(slots[step.right.slot], step.right)
        matrices.append((left, right))
        if step.swapped:
            product = _product(right.transpose(1, 2), left.transpose(1, 2))
        else:
            product = _product(left, right)
        slots.append(product.reshape(step.result_shape))
    return slots[-1].permute(program.output_permutation), matrices


def run(program: Program, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run ``program`` with plain (autograd-recorded) ops.

    >>> p = compile_plan((0, 1, ("b", "o")), [("b", "i"), ("i", "o")], [(2, 3), (3, 4)], ("b", "o"))
    >>> a, b = torch.randn(2, 3), torch.randn(3, 4)
    >>> torch.allclose(run(p, [a, b]), a @ b)
    True
    """
    return _forward(program, operands)[0]


class Contraction(torch.autograd.Function):
    """``run`` as one autograd node: backward is two ``bmm`` per step on the saved matrices.

    Under ``create_graph=True`` the backward differentiates the plain ops instead, so gradients
    of gradients (gradient penalties, Hessian-vector products) stay exact.

    >>> p = compile_plan((0, 1, ("b", "o")), [("b", "i"), ("i", "o")], [(2, 3), (3, 4)], ("b", "o"))
    >>> a, b = torch.randn(2, 3), torch.randn(3, 4, requires_grad=True)
    >>> Contraction.apply(p, a, b).sum().backward()
    >>> torch.allclose(b.grad, a.sum(0)[:, None].expand(3, 4))
    True
    """

    @staticmethod
    def forward(ctx, program: Program, *operands: torch.Tensor) -> torch.Tensor:
        output, matrices = _forward(program, operands)
        needs = list(ctx.needs_input_grad[1:])
        for step in program.steps:  # a result needs a gradient when an operand below it does
            needs.append(needs[step.left.slot] or needs[step.right.slot])
        ctx.program, ctx.needs = program, needs
        # keep a step's matrix only where the other side needs a gradient, and only for
        # intermediate results: an operand's matrix is remade from the operand in backward
        kept = [
            matrix
            for step, pair in zip(program.steps, matrices, strict=True)
            for side, other, matrix in (
                (step.left, step.right, pair[0]),
                (step.right, step.left, pair[1]),
            )
            if needs[other.slot] and side.slot >= program.n_operands
        ]
        ctx.save_for_backward(*operands, *kept)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        program: Program = ctx.program
        needs = ctx.needs
        everything = ctx.saved_tensors  # unpack once: checkpointing allows a single unpack
        operands, kept = everything[: program.n_operands], iter(everything[program.n_operands :])
        if torch.is_grad_enabled():  # create_graph=True: the saved operands carry their history
            return (None, *_differentiable_backward(program, operands, needs, grad_output))
        stored = []  # the forward's (left, right) matrices, None where no gradient needs them
        for step in program.steps:
            pair = []
            for side, other in ((step.left, step.right), (step.right, step.left)):
                if not needs[other.slot]:
                    pair.append(None)
                elif side.slot < program.n_operands:
                    pair.append(_matrix(operands[side.slot], side))
                else:
                    pair.append(next(kept))
            stored.append(pair)
        inverse = tuple(program.output_permutation.index(k) for k in range(grad_output.dim()))
        last = program.n_operands + len(program.steps) - 1
        grads: dict[int, torch.Tensor] = {last: grad_output.permute(inverse)}
        for index in range(len(program.steps) - 1, -1, -1):
            step = program.steps[index]
            grad = grads.pop(program.n_operands + index, None)
            if grad is None:
                continue
            left, right = stored[index]
            nb, rows, cols = step.left.matrix[0], step.left.matrix[1], step.right.matrix[2]
            if step.swapped:
                grad = grad.reshape(nb, cols, rows).transpose(1, 2)
            else:
                grad = grad.reshape(nb, rows, cols)
            if needs[step.left.slot]:
                _accumulate(grads, step.left, _product(grad, right.transpose(1, 2)))
            if needs[step.right.slot]:
                _accumulate(grads, step.right, _product(left.transpose(1, 2), grad))
        return (None, *(grads.get(k) for k in range(program.n_operands)))


def _accumulate(grads: dict[int, torch.Tensor], side: _Side, gradient: torch.Tensor) -> None:
    value = _unmatrix(gradient, side)
    previous = grads.get(side.slot)
    grads[side.slot] = value if previous is None else previous + value


def _differentiable_backward(
    program: Program, operands: Sequence[torch.Tensor], needs: list[bool], grad_output: torch.Tensor
) -> list[torch.Tensor | None]:
    inputs = [t for t, need in zip(operands, needs, strict=False) if need]
    output = run(program, operands)
    grads = iter(torch.autograd.grad(output, inputs, grad_output, create_graph=True))
    return [next(grads) if need else None for need in needs[: program.n_operands]]
