"""fxfactorize: a torch.fx pass that factorizes Linear/Conv layers into cheaper low-rank pairs.

>>> import torch, fxfactorize as ff
>>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
>>> gm = ff.transform(model, torch.randn(2, 512), progress=False)
>>> gm.meta["fxfactorize"].factorized[0].rank
128
"""

import logging

from fxfactorize import costmodels, policies, surgery
from fxfactorize._version import __version__
from fxfactorize.api import plan, transform
from fxfactorize.apply import apply_factorization
from fxfactorize.config import FactorizeConfig
from fxfactorize.core.composer_api import factorize_conv2d, factorize_matrix
from fxfactorize.core.solution import LowRankSolution
from fxfactorize.equivalence import (
    EquivalenceError,
    Tolerance,
    UnverifiedLayerError,
    check_equivalence,
)
from fxfactorize.errors import (
    CalibrationError,
    DistributedError,
    FactorizeError,
    FactorizeWarning,
    ShapePropagationError,
    TraceError,
)
from fxfactorize.healing import HealReport, heal
from fxfactorize.modules import (
    FactorizedConv1d,
    FactorizedConv2d,
    FactorizedConv3d,
    FactorizedLinear,
    FactorizedPair,
    factorizing_could_speedup,
)
from fxfactorize.persistence import LoadError, load, save
from fxfactorize.report import (
    LayerRecord,
    PartialPlan,
    PartialReport,
    Plan,
    Report,
    UntracedModule,
    report_of,
)

logging.getLogger("fxfactorize").addHandler(logging.NullHandler())


__all__ = [
    "__version__",
    "CalibrationError",
    "DistributedError",
    "apply_factorization",
    "surgery",
    "costmodels",
    "policies",
    "factorize_conv2d",
    "factorize_matrix",
    "FactorizeConfig",
    "FactorizeError",
    "FactorizeWarning",
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "FactorizedLinear",
    "FactorizedPair",
    "HealReport",
    "LayerRecord",
    "LoadError",
    "LowRankSolution",
    "PartialPlan",
    "PartialReport",
    "Plan",
    "Report",
    "ShapePropagationError",
    "TraceError",
    "UntracedModule",
    "factorizing_could_speedup",
    "heal",
    "load",
    "plan",
    "report_of",
    "save",
    "transform",
    "EquivalenceError",
    "UnverifiedLayerError",
    "Tolerance",
    "check_equivalence",
]
