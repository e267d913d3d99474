import torch
from torch import nn

import fxfactorize as ff


def test_transform_factorizes_a_wide_linear_and_keeps_shapes():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    gm = ff.transform(model, torch.randn(4, 512), progress=False)
    assert isinstance(gm.get_submodule("0"), ff.FactorizedLinear)
    assert isinstance(model[0], nn.Linear)
    assert gm(torch.randn(3, 512)).shape == (3, 10)
