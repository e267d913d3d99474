"""``cost_model="macs"``: Composer's rule, cost = multiply-adds."""

from __future__ import annotations

from fxfactorize.costmodels.base import LayerSite, register_cost_model

__all__ = ["MacsCostModel"]


@register_cost_model
class MacsCostModel:
    """Cost is the number of multiply-adds; a pair pays when it has strictly fewer (Composer's rule).

    >>> from fxfactorize.layers import LayerShape
    >>> site = LayerSite(LayerShape("linear", 512, 512, (), 1, positions=1, bias=True))
    >>> MacsCostModel().cost(site, 128), MacsCostModel().pays(site, 300)
    (131072, False)
    """

    name = "macs"
    unit = "MACs"
    margin = 0.0

    def cost(self, site: LayerSite, rank: int | None) -> float:
        layer = site.layer
        return layer.macs if rank is None else layer.factorized_macs(rank)

    def pays(self, site: LayerSite, rank: int) -> bool:
        return self.cost(site, rank) < self.cost(site, None)
