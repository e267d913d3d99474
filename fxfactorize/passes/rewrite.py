"""Pass 7, rewrite: put each solved replacement in place of its layer and regenerate the code."""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx, nn

__all__ = ["has_submodule", "replace_submodule", "rewrite"]


def has_submodule(root: nn.Module, target: str) -> bool:
    """Whether ``root`` has a submodule at dotted path ``target``.

    >>> has_submodule(nn.Sequential(nn.Linear(2, 2)), "0"), has_submodule(nn.Linear(2, 2), "0")
    (True, False)
    """
    try:
        root.get_submodule(target)
    except AttributeError:
        return False
    return True


def replace_submodule(root: nn.Module, target: str, new: nn.Module) -> nn.Module:
    """Set ``root``'s submodule at dotted path ``target`` to ``new``; return the one it replaced.

    >>> root = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    >>> old = replace_submodule(root, "0.0", nn.Identity())
    >>> type(old).__name__, type(root[0][0]).__name__
    ('Linear', 'Identity')
    """
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def rewrite(gm: fx.GraphModule, replacements: Mapping[str, nn.Module]) -> fx.GraphModule:
    """Swap each ``target → module`` of ``replacements`` into ``gm`` and ``recompile()``.

    The graph's nodes keep their names and targets; only the modules behind them change.
    """
    for target, module in replacements.items():
        replace_submodule(gm, target, module)
    gm.recompile()
    return gm
