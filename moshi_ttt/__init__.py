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
from .gating import TTTGating  # noqa: E402
from .layer import ParamGroup, TTTLayer, named_ttt_layers  # noqa: E402
from .patch import apply_ttt, set_ttt_eta, set_ttt_updates, ttt_gatings, ttt_info  # noqa: E402
from .streaming import TTTLMGen  # noqa: E402
from .ttt_mlp import TTTMLPGating  # noqa: E402
from .variants import VARIANTS  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ETA_NORMS",
    "TARGET_SOURCES",
    "VARIANTS",
    "ParamGroup",
    "TTTConfig",
    "TTTGating",
    "TTTLMGen",
    "TTTLayer",
    "TTTMLPGating",
    "apply_ttt",
    "load_ttt_config",
    "load_ttt_weights",
    "named_ttt_layers",
    "save_ttt_weights",
    "set_ttt_eta",
    "set_ttt_updates",
    "to_moshi_state_dict",
    "ttt_gatings",
    "ttt_info",
    "ttt_state_dict",
]
