"""The registry of TTT variants: ``TTTConfig.variant`` name -> :class:`~moshi_ttt.layer.TTTLayer` class.

``TTTConfig`` validates ``variant`` against it and takes each variant's own settings from it
(``SETTINGS``), and ``apply_ttt`` builds the layers from it. A new variant is a module implementing
:class:`~moshi_ttt.layer.TTTLayer` (docs/variants.md, "Adding a TTT variant") plus one entry here.
"""

from __future__ import annotations

from .inplace import InPlaceTTT
from .layer import ParamGroup, TTTLayer
from .mlp import TTTMLP

VARIANTS: dict[str, type[TTTLayer]] = {cls.VARIANT: cls for cls in (InPlaceTTT, TTTMLP)}


def variant_class(name: str) -> type[TTTLayer]:
    """The layer class of a variant name (``ValueError`` naming the registered ones otherwise)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown TTT variant {name!r}; registered variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def param_groups() -> dict[str, ParamGroup]:
    """Every TTT parameter group of every registered variant, by group name, in registry order."""
    out: dict[str, ParamGroup] = {}
    for cls in VARIANTS.values():
        for g in cls.PARAM_GROUPS:
            seen = out.setdefault(g.name, g)
            if (seen.label, seen.pretrained) != (g.label, g.pretrained):
                raise ValueError(f"TTT parameter group {g.name!r} is declared twice, with different meanings")
    return out
