"""The contraction engine behind tensorized layers: values and gradients against torch.einsum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxfactorize.tensorized import FactorizedLinear
from fxfactorize.tensorized.contract import cheapest_order, contract
from fxfactorize.tensorized.pairwise import Contraction, _compile

LETTERS = "abcdefg"


@st.composite
def expressions(draw):
    """2-5 operands over up to 7 indices (sizes 1-4), some shared, some in the output, some on
    one operand only (summed away), each operand's indices in a drawn order."""
    n_indices = draw(st.integers(2, len(LETTERS)))
    names = LETTERS[:n_indices]
    sizes = {i: draw(st.integers(1, 4)) for i in names}
    n_operands = draw(st.integers(2, 5))
    terms = []
    for _ in range(n_operands):
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
        terms.append(tuple(chosen))
    used = sorted({i for t in terms for i in t})
    output = tuple(draw(st.permutations(draw(st.lists(st.sampled_from(used), unique=True)))))
    return terms, output, sizes


@given(expressions(), st.integers(0, 2**31 - 1))
def test_contract_matches_einsum_in_value_and_gradient(expression, seed):
    terms, output, sizes = expression
    generator = torch.Generator().manual_seed(seed)
    operands = [
        torch.randn(*(sizes[i] for i in t), generator=generator, dtype=torch.float64) for t in terms
    ]
    spec = ",".join("".join(t) for t in terms) + "->" + "".join(output)
    leaves = [t.clone().requires_grad_(k % 2 == 0 or k == 1) for k, t in enumerate(operands)]
    expected = torch.einsum(spec, *leaves)
    got = contract(leaves, terms, output)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    needed = [t for t in leaves if t.requires_grad]
    want = torch.autograd.grad((expected * weights).sum(), needed, allow_unused=True)
    have = torch.autograd.grad((got * weights).sum(), needed, allow_unused=True)
    for w, h in zip(want, have, strict=True):
        torch.testing.assert_close(h, w, rtol=1e-10, atol=1e-10)


@given(
    expressions(),
    st.integers(0, 2**31 - 1),
    st.sampled_from([(False, True), (True, True), (True, False)]),
)
def test_every_layout_matches_einsum_in_value_and_gradient(expression, seed, layout):
    """compile_plan picks one of three layouts by estimated copying; each must be exact."""
    terms, output, sizes = expression
    generator = torch.Generator().manual_seed(seed)
    operands = [
        torch.randn(*(sizes[i] for i in t), generator=generator, dtype=torch.float64) for t in terms
    ]
    plan = cheapest_order(tuple(terms), output, tuple(sorted(sizes.items())))
    if isinstance(plan.tree, int):
        return
    program = _compile(plan.tree, terms, [t.shape for t in operands], output, *layout)
    spec = ",".join("".join(t) for t in terms) + "->" + "".join(output)
    leaves = [t.clone().requires_grad_(True) for t in operands]
    expected = torch.einsum(spec, *leaves)
    got = Contraction.apply(program, *leaves)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    want = torch.autograd.grad((expected * weights).sum(), leaves)
    have = torch.autograd.grad((got * weights).sum(), leaves)
    for w, h in zip(want, have, strict=True):
        torch.testing.assert_close(h, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt", "blocktt"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_layer_gradients_and_gradients_of_gradients_are_exact(factorization, implementation):
    torch.manual_seed(0)
    layer = FactorizedLinear(
        (2, 3),
        (3, 2),
        factorization=factorization,
        rank=0.6,
        implementation=implementation,
        dtype=torch.float64,
    )
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    factors = tuple(layer.factors)

    def forward(x, *factors):
        names = {f"factors.{k}": f for k, f in enumerate(factors)}
        return torch.func.functional_call(layer, names, (x,))

    assert torch.autograd.gradcheck(forward, (x, *factors))
    assert torch.autograd.gradgradcheck(forward, (x, *factors))


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt", "blocktt"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_compiled_training_step_matches_eager_in_one_graph(factorization, implementation):
    torch.manual_seed(1)
    layer = FactorizedLinear(
        (4, 8), (8, 4), factorization=factorization, rank=0.5, implementation=implementation
    )
    model = nn.Sequential(layer, nn.ReLU())
    x = torch.randn(6, 32)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    def gradients(module):
        module.zero_grad(set_to_none=True)
        out = module(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in layer.parameters()]

    expected_out, expected_grads = gradients(model)
    got_out, got_grads = gradients(torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(got_out, expected_out, rtol=1e-5, atol=1e-6)
    for got, expected in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
