"""The layout of a tensorized weight: its modes, its factors' shapes and their index labels.

The dense weight ``W`` (``[out, in]``, one per layer) is viewed as a tensor ``T`` with modes
``(layer, *in_modes, *out_modes)`` (the ``layer`` mode only when ``n_layers > 1``), where
``T[l, i_1..i_d, o_1..o_e] = W_l[o, i]`` and ``i``/``o`` are the row-major flat indices.
Each format is a list of factors, each a tensor labelled by index names; contracting all factors
gives ``T``. Index names: ``l`` layer, ``i0..`` input modes, ``o0..`` output modes, ``r..`` ranks.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["FORMATS", "Structure", "normalize_factorization"]

FORMATS = ("cp", "tucker", "tt", "blocktt")


def normalize_factorization(value: object, name: str = "factorization") -> str:
    """Lower-case format name (TensorLy-Torch spells ``'CP'``, ``'Tucker'``, ``'TT'``).

    >>> normalize_factorization("Tucker")
    'tucker'
    """
    if isinstance(value, str) and value.lower() in FORMATS:
        return value.lower()
    raise ValueError(f"{name} must be one of {list(FORMATS)}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class Structure:
    """A format with concrete mode sizes and ranks.

    ``ranks``: CP ``(R,)``; Tucker one rank per mode (layer mode first); TT and blockTT the
    ``n_cores + 1`` bond sizes with ``1`` at both ends (TensorLy's convention).

    >>> s = Structure("tt", (4, 4), (4, 4), 1, (1, 3, 5, 3, 1))
    >>> s.n_parameters, [f[0] for f in s.factors()]
    (144, [(1, 4, 3), (3, 4, 5), (5, 4, 3), (3, 4, 1)])
    """

    format: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    n_layers: int
    ranks: tuple[int, ...]

    @property
    def mode_names(self) -> list[str]:
        layer = ["l"] if self.n_layers > 1 else []
        return (
            layer
            + [f"i{k}" for k in range(len(self.in_modes))]
            + [f"o{k}" for k in range(len(self.out_modes))]
        )

    @property
    def mode_sizes(self) -> dict[str, int]:
        sizes = ([self.n_layers] if self.n_layers > 1 else []) + [*self.in_modes, *self.out_modes]
        return dict(zip(self.mode_names, sizes, strict=True))

    def core_groups(self) -> list[tuple[str, ...]]:
        """Modes carried by each TT core: one mode each for TT, ``(i_k, o_k)`` pairs for blockTT."""
        if self.format == "tt":
            return [(m,) for m in self.mode_names]
        layer = [("l",)] if self.n_layers > 1 else []
        return layer + [(f"i{k}", f"o{k}") for k in range(len(self.in_modes))]

    def factors(self) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
        """``(shape, index labels)`` of each factor, in parameter order."""
        sizes = self.mode_sizes
        if self.format == "cp":
            return [((sizes[m], self.ranks[0]), (m, "r")) for m in self.mode_names]
        if self.format == "tucker":
            rank_names = tuple(f"r{m}" for m in self.mode_names)
            core = (tuple(self.ranks), rank_names)
            return [core] + [
                ((sizes[m], r), (m, f"r{m}"))
                for m, r in zip(self.mode_names, self.ranks, strict=True)
            ]
        out = []
        for k, group in enumerate(self.core_groups()):
            shape = (self.ranks[k], *(sizes[m] for m in group), self.ranks[k + 1])
            out.append((shape, (f"r{k}", *group, f"r{k + 1}")))
        return out

    @property
    def n_parameters(self) -> int:
        """Parameters of the factors (bias excluded)."""
        return sum(math.prod(shape) for shape, _ in self.factors())

    @property
    def rank_sizes(self) -> dict[str, int]:
        """Size of every rank index (summed once each in the reconstruction)."""
        sizes: dict[str, int] = {}
        for shape, labels in self.factors():
            for label, n in zip(labels, shape, strict=True):
                if label.startswith("r"):
                    sizes[label] = n
        return sizes

    def max_ranks(self) -> tuple[int, ...]:
        """Largest useful ranks (beyond them a format only adds parameters)."""
        sizes = self.mode_sizes
        if self.format == "cp":
            return (math.prod(sizes.values()) // max(sizes.values()),)
        if self.format == "tucker":
            total = math.prod(sizes.values())
            return tuple(min(n, total // n) for n in sizes.values())
        dims = [math.prod(sizes[m] for m in g) for g in self.core_groups()]
        bonds = [1]
        for k in range(1, len(dims)):
            bonds.append(min(math.prod(dims[:k]), math.prod(dims[k:])))
        return (*bonds, 1)
