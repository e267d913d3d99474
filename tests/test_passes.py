"""Each pass of the pipeline on its own."""

import pytest
import torch
from torch import nn

from fxfactorize import FactorizeConfig, FactorizedConv2d, FactorizedLinear
from fxfactorize.errors import ShapePropagationError, TraceError
from fxfactorize.methods import get_method
from fxfactorize.passes.cost import LAYER_META, annotate_costs
from fxfactorize.passes.plan import plan_graph
from fxfactorize.passes.rewrite import rewrite
from fxfactorize.passes.shapes import normalize_inputs, propagate_shapes
from fxfactorize.passes.solve import solve_plan
from fxfactorize.passes.trace import trace


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, scale=2.0):
        return self.proj(x) * scale


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return x


def annotated(model, example):
    return annotate_costs(propagate_shapes(trace(model), example))


def test_trace_keeps_factorized_pairs_as_leaves():
    model = nn.Sequential(FactorizedLinear(512, 512, latent_features=8), nn.ReLU())
    ops = [(n.op, n.target) for n in trace(model).graph.nodes]
    assert ("call_module", "0") in ops
    assert not any(str(t).startswith("0.module") for _, t in ops)


def test_trace_honours_leaf_module_names_and_types():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert ("call_module", "0") in [(n.op, n.target) for n in trace(model, ["0"]).graph.nodes]
    by_type = trace(model, [nn.Sequential]).graph.nodes
    assert ("call_module", "0") in [(n.op, n.target) for n in by_type]


def test_trace_error_names_class_and_reason():
    with pytest.raises(TraceError) as caught:
        trace(DataDependent())
    assert caught.value.module_class == "DataDependent"
    assert "DataDependent" in str(caught.value)
    assert caught.value.reason


def test_trace_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        trace(lambda x: x)


def test_normalize_inputs_accepts_tensor_tuple_and_dict():
    gm = trace(TwoInputs())
    x = torch.randn(2, 8)
    assert normalize_inputs(gm, x)[0] is x
    assert normalize_inputs(gm, (x, 3.0))[1] == 3.0
    assert normalize_inputs(gm, {"x": x})[1] == 2.0  # default of `scale`
    with pytest.raises(ValueError, match="'y'"):
        normalize_inputs(gm, {"y": x})
    with pytest.raises(TypeError, match="example_inputs"):
        normalize_inputs(gm, "not an input")


def test_shapes_annotate_every_node_and_keep_training_flags():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).train()
    gm = trace(model)
    running_mean = model[1].running_mean.clone()
    propagate_shapes(gm, torch.randn(5, 8))
    shapes = {
        n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"
    }
    assert shapes == {"input_1": (5, 8), "_0": (5, 16), "_1": (5, 16), "_2": (5, 4)}
    assert gm.training and model[1].training
    assert torch.equal(model[1].running_mean, running_mean)  # eval mode: no statistics update


def test_shape_error_names_the_node_and_target():
    gm = trace(nn.Sequential(nn.Linear(8, 16), nn.Linear(32, 4)))
    with pytest.raises(ShapePropagationError) as caught:
        propagate_shapes(gm, torch.randn(2, 8))
    assert caught.value.node_name == "_1"
    assert caught.value.target == "1"
    assert "'_1'" in str(caught.value)


def test_cost_counts_macs_and_params_at_traced_shapes():
    gm = annotated(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
        ),
        torch.randn(2, 3, 8, 8),
    )
    layers = [n.meta[LAYER_META] for n in gm.graph.nodes if LAYER_META in n.meta]
    conv, linear = layers
    assert conv.macs == 2 * 4 * 4 * (3 * 9) * 8
    assert conv.params == 3 * 9 * 8 + 8
    assert linear.macs == 2 * 128 * 10
    assert linear.factorized_macs(4) == 2 * 4 * (128 + 10)
    assert linear.factorized_params(4) == 4 * (128 + 10) + 10


def test_cost_counts_linear_on_inputs_of_any_rank():
    gm = annotated(nn.Sequential(nn.Linear(8, 4)), torch.randn(2, 3, 5, 8))
    (layer,) = [n.meta[LAYER_META] for n in gm.graph.nodes if LAYER_META in n.meta]
    assert layer.positions == 30
    assert layer.macs == 30 * 8 * 4


def test_plan_applies_composer_rules_with_reasons():
    model = nn.Sequential(
        nn.Linear(512, 512),  # planned at 128
        nn.Linear(512, 100),  # too narrow
    )
    gm = annotated(model, torch.randn(1, 512))
    plan = plan_graph(gm, FactorizeConfig())
    assert [r.rank for r in plan.layers] == [128, None]
    assert plan.layers[1].reason == "min(in, out)=100 < min_features=256"
    expensive = plan_graph(gm, FactorizeConfig(latent_features=300))
    assert expensive.layers[0].rank is None
    assert "does not reduce MACs" in expensive.layers[0].reason
    disabled = plan_graph(gm, FactorizeConfig(linears=False))
    assert disabled.layers[0].reason == "linears=False"


def test_plan_fraction_is_of_the_smaller_side_and_pure():
    model = nn.Sequential(nn.Conv2d(256, 512, 3, padding=1))
    gm = annotated(model, torch.randn(1, 256, 4, 4))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    (record,) = plan_graph(gm, FactorizeConfig()).layers
    assert record.rank == 64  # 0.25 × min(256, 512)
    assert record.macs_after == 16 * 64 * (256 * 9 + 512)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_plan_factorizes_grouped_convs_per_group():
    gm = annotated(nn.Sequential(nn.Conv2d(256, 256, 3, groups=4)), torch.randn(1, 256, 5, 5))
    (record,) = plan_graph(gm, FactorizeConfig()).layers
    assert record.rank == 64 and record.rank % 4 == 0 and record.macs_after < record.macs_before


def test_plan_skips_depthwise_convs_with_a_reason():
    gm = annotated(nn.Sequential(nn.Conv2d(256, 256, 3, groups=256)), torch.randn(1, 256, 5, 5))
    (record,) = plan_graph(gm, FactorizeConfig()).layers
    assert record.rank is None and "depthwise" in record.reason and "groups=256" in record.reason


def test_solve_and_rewrite_swap_in_factorized_pairs():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Conv2d(256, 256, 1))
    gm = annotate_costs(propagate_shapes(trace(model[:1]), torch.randn(2, 512)))
    plan = plan_graph(gm, FactorizeConfig())
    solved = solve_plan(gm, plan, progress=False)
    assert set(solved) == {"0"} and isinstance(solved["0"].module, FactorizedLinear)
    assert isinstance(gm.get_submodule("0"), nn.Linear)  # solve does not change the graph
    rewrite(gm, {t: s.module for t, s in solved.items()})
    assert isinstance(gm.get_submodule("0"), FactorizedLinear)
    assert gm(torch.randn(3, 512)).shape == (3, 512)


def test_lowrank_rebuild_recreates_structure_from_describe():
    conv = nn.Conv2d(256, 256, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
    gm = annotated(nn.Sequential(conv), torch.randn(1, 256, 9, 9))
    layer = next(n.meta[LAYER_META] for n in gm.graph.nodes if LAYER_META in n.meta)
    method = get_method("lowrank")
    solved = method.solve(conv, layer, 32, None)
    spec = method.describe(solved.module)
    rebuilt = method.rebuild(conv, layer, spec)
    rebuilt.load_state_dict(solved.module.state_dict())
    x = torch.randn(2, 256, 9, 9)
    assert isinstance(rebuilt, FactorizedConv2d)
    assert torch.equal(rebuilt(x), solved.module(x))
