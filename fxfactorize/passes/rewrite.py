"""Pass 7, rewrite: put each solved replacement in place of its layer and regenerate the code."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import fx, nn

__all__ = ["has_submodule", "install", "replace_submodule", "rewrite"]


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


def install(root: nn.Module, replacements: Mapping[nn.Module, nn.Module]) -> Callable[[], None]:
    """Put each ``old → new`` of ``replacements`` in place of ``old`` under every name it has in
    ``root`` (two parents, aliases); return a function that undoes it.

    >>> fc = nn.Linear(2, 2)
    >>> root = nn.Sequential(fc, nn.Sequential(fc))
    >>> undo = install(root, {fc: nn.Identity()})
    >>> type(root[0]).__name__, type(root[1][0]).__name__
    ('Identity', 'Identity')
    >>> undo(); root[1][0] is fc
    True
    """
    by_id = {id(old): new for old, new in replacements.items()}
    slots: list[tuple[nn.Module, str, nn.Module]] = []
    seen: set[int] = set()
    stack = [root]
    while stack:  # every (parent, attribute) holding a replaced module, aliases included
        parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for name, child in parent._modules.items():
            if child is None:
                continue
            if id(child) in by_id:
                slots.append((parent, name, child))
            else:
                stack.append(child)
    for parent, name, child in slots:
        setattr(parent, name, by_id[id(child)])

    def undo() -> None:
        for parent, name, child in slots:
            setattr(parent, name, child)

    return undo
