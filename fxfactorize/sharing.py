"""Shared modules and tied parameters: every name a module is reachable by, and which layers'
parameters are also held by another module (an output layer tied to an embedding).

A module object reachable under several names (two parents, or ``self.b = self.a``) is *shared*: it
gets one replacement, installed under every name. A parameter held by two module objects is *tied*:
replacing one holder would untie it, so such layers are left alone.
"""

from __future__ import annotations

from torch import nn

__all__ = ["module_names", "tied_layers"]


def _walk(root: nn.Module, prefix: str = "", path: tuple[int, ...] = ()):
    """``(name, module)`` for every path from ``root``, aliases included (cycles cut)."""
    yield prefix, root
    for name, child in root._modules.items():
        if child is None or id(child) in path:
            continue
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, (*path, id(root)))


def module_names(root: nn.Module, module: nn.Module) -> list[str]:
    """Every qualified name under which ``module`` is reachable from ``root``, in visiting order.

    >>> fc = nn.Linear(2, 2)
    >>> root = nn.Sequential(nn.Sequential(fc), fc)
    >>> root.alias = fc
    >>> module_names(root, fc)
    ['0.0', '1', 'alias']
    """
    return [name for name, candidate in _walk(root) if candidate is module]


def tied_layers(root: nn.Module) -> dict[str, str]:
    """``{qualified module name: reason}`` for modules holding a parameter that another module
    object holds too (every name of such a module is listed).

    >>> class Tied(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Embedding(10, 4)
    ...         self.head = nn.Linear(4, 10, bias=False)
    ...         self.head.weight = self.embed.weight
    >>> tied_layers(Tied())
    {'embed': 'weight tied to head.weight', 'head': 'weight tied to embed.weight'}
    """
    holders: dict[int, list[tuple[str, str, nn.Module]]] = {}
    seen: set[int] = set()
    named = list(_walk(root))
    for name, module in named:
        if id(module) in seen:
            continue
        seen.add(id(module))
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((name, attr, module))
    reasons: dict[int, str] = {}
    for owners in holders.values():
        if len({id(module) for _, _, module in owners}) < 2:
            continue
        for _, attr, module in owners:
            others = [f"{n}.{a}" if n else a for n, a, m in owners if m is not module]
            reasons.setdefault(id(module), f"{attr} tied to {', '.join(others)}")
    return {name: reasons[id(module)] for name, module in named if id(module) in reasons}
