"""Pass 1, trace: ``nn.Module`` → ``torch.fx.GraphModule``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from fxfactorize.errors import TraceError
from fxfactorize.layers import FactorizedLayer

__all__ = ["DEFAULT_LEAF_MODULES", "FactorizeTracer", "trace"]

# Kept whole: attention packs its projections into one parameter (nothing for a Linear pass to
# take) and inlining it would add dozens of nodes per layer. ``torch.nn`` layers are leaves anyway;
# listing it makes the policy explicit and survives torch.fx changing its default.
DEFAULT_LEAF_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


class FactorizeTracer(fx.Tracer):
    """torch.fx's tracer with a leaf-module policy.

    Leaves are torch.fx's defaults (``torch.nn`` layers), fxfactorize's own factorized pairs (so
    a transformed model re-traces to the same nodes), and whatever ``leaf_modules`` names: module
    types, or qualified names of submodules.
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        leaves = (*DEFAULT_LEAF_MODULES, *leaf_modules)
        self.leaf_types = tuple(leaf for leaf in leaves if isinstance(leaf, type))
        self.leaf_names = frozenset(leaf for leaf in leaves if isinstance(leaf, str))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (FactorizedLayer, *self.leaf_types)):
            return True
        if module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(
    model: nn.Module,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule whose submodules are ``model``'s own objects.

    ``leaf_modules`` adds module types or qualified names kept as opaque calls;
    ``concrete_args`` fixes some inputs to constants while tracing (as ``torch.fx.symbolic_trace``).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        TraceError: naming the module class and torch.fx's reason, if tracing fails.

    >>> gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> [node.op for node in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    tracer = FactorizeTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as error:  # torch.fx raises many types; all mean "cannot trace"
        reason = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        raise TraceError(type(model).__name__, reason) from error
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    return gm
