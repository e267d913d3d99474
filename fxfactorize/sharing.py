"""Tied parameters: which layers hold a parameter that another module holds too (an output layer
tied to an embedding). Replacing one holder would untie them, so such layers are left alone.

(A module object reachable under several names is *shared*, not tied: it gets one replacement,
installed under every name by :func:`fxfactorize.passes.rewrite.install`.)
"""

from __future__ import annotations

from torch import nn

__all__ = ["tied_layers"]


def _walk(root: nn.Module, prefix: str = "", path: tuple[int, ...] = ()):
    """``(name, module)`` for every path from ``root``, aliases included (cycles cut)."""
    yield prefix, root
    for name, child in root._modules.items():
        if child is None or id(child) in path:
            continue
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, (*path, id(root)))


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
