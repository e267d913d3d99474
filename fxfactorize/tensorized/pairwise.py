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

_LAYOUT_MARGIN = 0.75  # see compile_plan
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

    @property
    def permuted_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[k] for k in self.permutation)


@dataclasses.dataclass(frozen=True)
class _Step:
    left: _Side
    right: _Side
    result_shape: tuple[int, ...]
    swapped: bool  # the result is stored [batch, right kept, left kept]: see _swap


@dataclasses.dataclass(frozen=True)
class Program:
    """Steps over numbered slots (operands first, then each step's result, in order)."""

    steps: tuple[_Step, ...]
    n_operands: int
    output_permutation: tuple[int, ...]  # from the last result's order to the requested output

    @functools.cached_property
    def kernels(self) -> dict[tuple[bool, ...], tuple]:
        """Generated forward/backward functions, per pattern of operands needing gradients."""
        return {}

    def kernel(self, needs: tuple[bool, ...]) -> tuple:
        """``(forward, backward)`` straight-line functions for these operand ``needs``."""
        found = self.kernels.get(needs)
        if found is None:
            found = self.kernels[needs] = _generate(self, needs)
        return found


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

    Three layouts are compiled: every step laid out for the order its consumer wants (only leaves
    get permuted), or every step laid out in the order of its operands (leaves stay as they are,
    so a large factor is never permuted), with the last step in the output's order or in its
    operands' order too (then one permutation at the end). The operand-ordered one is kept when
    its estimated copying (:func:`_copied_elements`) is under 3/4 of the consumer-ordered one's:
    at 1024×1024, Tucker then no longer copies its 1 MB core three times per training step.

    >>> p = compile_plan((0, 1, ("b", "o")), [("b", "i"), ("i", "o")], [(2, 3), (3, 4)], ("b", "o"))
    >>> len(p.steps), p.steps[0].left.matrix, p.steps[0].right.matrix
    (1, (1, 2, 3), (1, 3, 4))
    """
    consumer, *others = (
        _compile(tree, terms, shapes, output, natural, root)
        for natural, root in ((False, True), (True, True), (True, False))
    )
    best = min(others, key=_copied_elements)
    # the copy-cost estimate is rough: leave the consumer-ordered layout only for a clear gain
    return (
        best if _copied_elements(best) < _LAYOUT_MARGIN * _copied_elements(consumer) else consumer
    )


def _copy_cost(shape: Sequence[int], permutation: tuple[int, ...]) -> float:
    """Relative cost of copying a tensor of ``shape`` into ``permutation`` order: its elements,
    weighted by how scattered the copy is (measured on CPU: a 4 MB copy that keeps runs of
    whole rows costs about a plain copy; one in 6 pieces whose innermost run moves, 3×)."""
    dims = [k for k in permutation if shape[k] != 1]
    pieces = 1 + sum(1 for a, b in zip(dims, dims[1:], strict=False) if b != a + 1)
    moved = bool(dims) and dims[-1] != max(dims)
    return math.prod(shape) * (1 + 0.3 * (pieces - 1) + 1.5 * moved)


def _copied_elements(program: Program) -> float:
    """Weighted elements a run of ``program`` copies to lay out its operands and its output."""
    total = 0.0
    for step in program.steps:
        for side in (step.left, step.right):
            if side.summed:
                total += math.prod(side.shape)
            if not _is_identity(side.permutation):
                total += _copy_cost(side.shape, side.permutation)
    if not _is_identity(program.output_permutation):
        total += _copy_cost(program.steps[-1].result_shape, program.output_permutation)
    return total


def _compile(
    tree: object,
    terms: Sequence[tuple[str, ...]],
    shapes: Sequence[tuple[int, ...]],
    output: tuple[str, ...],
    natural_layout: bool,
    root_in_output_order: bool,
) -> Program:
    slot_terms = [tuple(t) for t in terms]
    slot_shapes = [tuple(s) for s in shapes]
    size: dict[str, int] = {}
    for term, shape in zip(slot_terms, slot_shapes, strict=True):
        size.update(zip(term, shape, strict=True))
    steps: list[_Step] = []

    def indices(node: object) -> set[str]:
        return set(slot_terms[node]) if isinstance(node, int) else set(node[2])

    def walk(node: object, desired: tuple[str, ...] | None) -> int:
        """Compile ``node`` so that its result comes out in ``desired`` order where it can: each
        step lays its operands out the way it consumes them, so only leaves get permuted. With
        ``desired=None`` (the natural layout) children are compiled first and each step keeps
        the order its operands already have."""
        if isinstance(node, int):
            return node
        left_node, right_node, term = node
        set_a, set_b, wanted = indices(left_node), indices(right_node), set(term)
        shared = set_a & set_b
        if natural_layout:
            a, b = walk(left_node, None), walk(right_node, None)
            ta, tb = slot_terms[a], slot_terms[b]
            # indices both sides have follow the larger operand: the smaller one is permuted
            big = ta if math.prod(slot_shapes[a]) >= math.prod(slot_shapes[b]) else tb
            order = desired if desired is not None else big
            batch = [i for i in order if i in shared and i in wanted]
            contracted = [i for i in big if i in shared and i not in wanted]
            left_kept = [i for i in (desired or ta) if i in set_a - shared and i in wanted]
            right_kept = [i for i in (desired or tb) if i in set_b - shared and i in wanted]
        else:
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

    last = walk(tree, tuple(output) if root_in_output_order else None)
    final = slot_terms[last]
    if sorted(final) != sorted(output):
        raise ValueError(f"the plan produces {final}, not the requested output {output}")
    return Program(tuple(steps), len(terms), tuple(final.index(i) for i in output))


def _swap(desired, batch, natural, swapped, rows: int, cols: int) -> bool:
    """Whether a step stores its result ``[batch, right kept, left kept]``: when that is the order
    its consumer wants; else the orientation whose product needs no transposing copy (the consumer
    copies anyway); else the one that starts like the wanted order."""
    if desired is None:  # no consumer order to meet
        desired = ()
    for candidate, is_swapped in ((natural, False), (swapped, True)):
        if tuple(candidate) == desired:
            return is_swapped
    natural_copies = cols < min(rows, _SKINNY)  # see _product_source
    if natural_copies != (rows < min(cols, _SKINNY)):
        return natural_copies
    head = len(batch)
    if head < len(desired):
        for candidate, is_swapped in ((natural, False), (swapped, True)):
            if candidate[head] == desired[head]:
                return is_swapped
    return natural_copies


def run(program: Program, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run ``program`` with plain (autograd-recorded) ops.

    >>> p = compile_plan((0, 1, ("b", "o")), [("b", "i"), ("i", "o")], [(2, 3), (3, 4)], ("b", "o"))
    >>> a, b = torch.randn(2, 3), torch.randn(3, 4)
    >>> torch.allclose(run(p, [a, b]), a @ b)
    True
    """
    forward, _ = program.kernel((False,) * program.n_operands)
    return forward(torch, *operands)[0]


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
        needs = tuple(ctx.needs_input_grad[1:])
        forward, backward = program.kernel(needs)
        output, kept = forward(torch, *operands)
        ctx.program, ctx.needs, ctx.backward = program, needs, backward
        ctx.save_for_backward(*operands, *kept)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        program: Program = ctx.program
        everything = ctx.saved_tensors  # unpack once: checkpointing allows a single unpack
        operands = everything[: program.n_operands]
        if torch.is_grad_enabled():  # create_graph=True: the saved operands carry their history
            return (None, *_differentiable_backward(program, operands, ctx.needs, grad_output))
        return (None, *ctx.backward(torch, grad_output, *everything))


def _differentiable_backward(
    program: Program,
    operands: Sequence[torch.Tensor],
    needs: tuple[bool, ...],
    grad_output: torch.Tensor,
) -> list[torch.Tensor | None]:
    inputs = [t for t, need in zip(operands, needs, strict=True) if need]
    output = run(program, operands)
    grads = iter(torch.autograd.grad(output, inputs, grad_output, create_graph=True))
    return [next(grads) if need else None for need in needs]


# -- code generation ---------------------------------------------------------------------------
# Each program becomes two straight-line Python functions (forward, backward) with every shape,
# permutation and product route fixed as constants: at 256×256 layers the interpreter loop over
# steps, dataclass lookups and shape tests cost as much as the arithmetic.


def _is_identity(permutation: tuple[int, ...]) -> bool:
    return permutation == tuple(range(len(permutation)))


def _inverse(permutation: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(permutation.index(k) for k in range(len(permutation)))


def _permute_source(expr: str, permutation: tuple[int, ...]) -> str:
    """``expr`` permuted (nothing to write for the identity)."""
    return expr if _is_identity(permutation) else f"{expr}.permute({permutation!r})"


def _t(expr: str) -> str:
    """``expr`` with its last two dimensions swapped (cancelling a trailing swap)."""
    suffix = ".transpose(1, 2)"
    return expr[: -len(suffix)] if expr.endswith(suffix) else expr + suffix


def _matrix_source(name: str, side: _Side) -> str:
    expr = name
    if side.summed:
        expr += f".sum({side.summed})"
    expr = _permute_source(expr, side.permutation)
    nb, rows, cols = side.matrix
    if side.transposed:
        return expr + f".reshape({nb}, {cols}, {rows}).transpose(1, 2)"
    return expr + f".reshape({nb}, {rows}, {cols})"


def _unmatrix_source(expr: str, side: _Side, stored_order: bool = False) -> str:
    """``expr`` (the side's ``[batch, rows, cols]`` matrix, or with ``stored_order`` the
    ``[batch, cols, rows]`` one of a transposed side) back in the operand's shape."""
    if side.transposed and not stored_order:
        expr += ".transpose(1, 2)"
    expr = _permute_source(f"{expr}.reshape({side.permuted_shape!r})", _inverse(side.permutation))
    if side.summed:
        for dim in side.summed:
            expr += f".unsqueeze({dim})"
        expr += f".expand({side.original!r})"
    return expr


def _product_source(a: str, b: str, m: int, k: int, n: int) -> str:
    """``bmm(a, b)`` for ``a [B, m, k]``, ``b [B, k, n]`` by its fastest CPU route (measured:
    oneDNN runs a tall-skinny product 3× faster transposed, and outer products or matrix-vector
    stacks faster as broadcast multiplies than as a batched GEMM)."""
    if k == 1:
        return f"({a} * {b})"
    if n == 1:
        return f"({a} * {_t(b)}).sum(2, keepdim=True)"
    if m == 1:
        return f"({_t(a)} * {b}).sum(1, keepdim=True)"
    if n < min(m, _SKINNY):  # fill the long side of the output along its contiguous rows
        return f"torch.bmm({_t(b)}, {_t(a)}).transpose(1, 2)"
    return f"torch.bmm({a}, {b})"


def _needs_of(program: Program, needs: tuple[bool, ...]) -> list[bool]:
    """Per slot: whether a gradient flows to it (a result does when an operand below it does)."""
    every = list(needs)
    for step in program.steps:
        every.append(every[step.left.slot] or every[step.right.slot])
    return every


def _generate(program: Program, needs: tuple[bool, ...]) -> tuple:
    every = _needs_of(program, needs)
    n = program.n_operands
    slots = ", ".join(f"s{k}" for k in range(n))
    forward = [f"def forward(torch, {slots}):"]
    kept: list[str] = []  # matrices of intermediate results the backward needs
    for index, step in enumerate(program.steps):
        nb, m, k = step.left.matrix
        cols = step.right.matrix[2]
        forward.append(f"    l{index} = {_matrix_source(f's{step.left.slot}', step.left)}")
        forward.append(f"    r{index} = {_matrix_source(f's{step.right.slot}', step.right)}")
        if step.swapped:
            a, b, shape = _t(f"r{index}"), _t(f"l{index}"), (cols, k, m)
        else:
            a, b, shape = f"l{index}", f"r{index}", (m, k, cols)
        product = _product_source(a, b, *shape)
        forward.append(f"    s{n + index} = {product}.reshape({step.result_shape!r})")
        for side, other, name in ((step.left, step.right, "l"), (step.right, step.left, "r")):
            if every[other.slot] and side.slot >= n:
                kept.append(f"{name}{index}")
    last = n + len(program.steps) - 1
    output = _permute_source(f"s{last}", program.output_permutation)
    forward.append(f"    return {output}, [{', '.join(kept)}]")

    saved = ", ".join([f"s{k}" for k in range(n)] + kept)
    backward = [f"def backward(torch, grad_output, {saved}):"]
    grad = _permute_source("grad_output", _inverse(program.output_permutation))
    backward.append(f"    g{last} = {grad}")
    for index in range(len(program.steps) - 1, -1, -1):
        step = program.steps[index]
        if not every[n + index]:
            continue
        nb, m, k = step.left.matrix
        cols = step.right.matrix[2]
        if step.swapped:
            backward.append(f"    gm = g{n + index}.reshape({nb}, {cols}, {m}).transpose(1, 2)")
        else:
            backward.append(f"    gm = g{n + index}.reshape({nb}, {m}, {cols})")
        for side, other, name in ((step.left, step.right, "l"), (step.right, step.left, "r")):
            if not every[side.slot]:
                continue
            other_name = f"{'r' if name == 'l' else 'l'}{index}"
            if other.slot < n:  # an operand's matrix is remade rather than saved
                backward.append(f"    {other_name} = {_matrix_source(f's{other.slot}', other)}")
            # a side read through a transposed view gets its gradient as the transposed
            # product, which comes out in the operand's own order (no transposing copy)
            if name == "l" and side.transposed:  # d left^T [nb, k, m] = right @ gm^T
                product = _product_source(other_name, _t("gm"), k, cols, m)
            elif name == "l":  # d left [nb, m, k] = gm [nb, m, cols] @ right^T [nb, cols, k]
                product = _product_source("gm", _t(other_name), m, cols, k)
            elif side.transposed:  # d right^T [nb, cols, k] = gm^T [nb, cols, m] @ left
                product = _product_source(_t("gm"), other_name, cols, m, k)
            else:  # d right [nb, k, cols] = left^T [nb, k, m] @ gm [nb, m, cols]
                product = _product_source(_t(other_name), "gm", k, m, cols)
            source = _unmatrix_source(product, side, stored_order=side.transposed)
            backward.append(f"    g{side.slot} = {source}")
    grads = ", ".join(f"g{k}" if needs[k] else "None" for k in range(n))
    backward.append(f"    return ({grads},)")
    namespace: dict = {}
    exec(
        compile("\n".join(forward + backward), f"<contraction {id(program):x}>", "exec"), namespace
    )
    return namespace["forward"], namespace["backward"]
