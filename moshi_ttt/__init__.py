"""In-Place Test-Time Training for Kyutai's Moshi.

``from moshi_ttt import TTTConfig, apply_ttt`` works on any ``moshi.models.LMModel``. This package
imports only torch and moshi.
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    # moshi reads this when it is first imported; without it, the first CPU forward spends 7-20 s in
    # torch.compile for an RMSNorm kernel. GPU users keep moshi's compiled kernels.
    _os.environ.setdefault("NO_TORCH_COMPILE", "1")

from .checkpoint import (  # noqa: E402
    load_ttt_config,
    load_ttt_weights,
    save_ttt_weights,
    to_moshi_state_dict,
    ttt_state_dict,
)
from .config import ETA_NORMS, TARGET_SOURCES, TTTConfig  # noqa: E402
from .deprecation import alias_modules, moved_attributes  # noqa: E402
from .inplace import InPlaceSettings, InPlaceTTT  # noqa: E402
from .layer import ParamGroup, TTTLayer, VariantSettings, named_ttt_layers  # noqa: E402
from .mlp import TTTMLP, TTTMLPSettings  # noqa: E402
from .patch import apply_ttt, set_ttt_eta, set_ttt_updates, ttt_info, ttt_layers  # noqa: E402
from .streaming import TTTLMGen  # noqa: E402
from .variants import VARIANTS  # noqa: E402

# What was renamed (issue 24): the old names work with a DeprecationWarning until the next release.
alias_modules({"moshi_ttt.gating": "moshi_ttt.inplace", "moshi_ttt.ttt_mlp": "moshi_ttt.mlp"})
__getattr__ = moved_attributes(
    __name__,
    {
        "TTTGating": "moshi_ttt.inplace:InPlaceTTT",
        "TTTMLPGating": "moshi_ttt.mlp:TTTMLP",
        "ttt_gatings": "moshi_ttt.patch:ttt_layers",
    },
)

__version__ = "0.1.0"
__all__ = [
    "ETA_NORMS",
    "TARGET_SOURCES",
    "VARIANTS",
    "InPlaceSettings",
    "InPlaceTTT",
    "ParamGroup",
    "TTTConfig",
    "TTTLMGen",
    "TTTLayer",
    "TTTMLP",
    "TTTMLPSettings",
    "VariantSettings",
    "apply_ttt",
    "load_ttt_config",
    "load_ttt_weights",
    "named_ttt_layers",
    "save_ttt_weights",
    "set_ttt_eta",
    "set_ttt_updates",
    "to_moshi_state_dict",
    "ttt_info",
    "ttt_layers",
    "ttt_state_dict",
]
