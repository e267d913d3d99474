"""The four torchvision families of the issue trace, transform with the defaults, and run."""

import pytest
import torch
import torchvision

import fxfactorize as ff


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16", "mobilenet_v3_large", "convnext_tiny"])
def test_torchvision_model_transforms_and_keeps_output_shape(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    gm = ff.transform(model, x, progress=False)
    report = gm.meta["fxfactorize"]
    assert report.factorized, f"{name}: nothing factorized"
    assert report.totals()["macs_after"] < report.totals()["macs_before"]
    with torch.no_grad():
        expected, actual = model(x), gm(x)
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
