"""Configuration of the TTT layers of a Moshi model: :class:`TTTConfig`.

`TTTConfig` holds everything that changes what a TTT model computes: the settings every variant
shares (:class:`CommonSettings`) and each registered variant's own (its layer class's ``SETTINGS``,
declared in the variant's module). It is stored beside a checkpoint (in the TTT safetensors file's
metadata), never inside Moshi's own ``config.json``: moshi passes every key of that file to
``LMModel`` and an unknown key is a ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

# The In-Place variant's choices are declared with it; importable from here as before.
from .inplace import ETA_NORMS, FAST_FORMS, TARGET_SOURCES, UPDATE_PRECISIONS, WRITE_GATE_INPUTS
from .layer import FIXED_ON_RESUME, VariantSettings, is_int, setting_error
from .variants import VARIANTS

_FIXED = FIXED_ON_RESUME  # older name


@dataclass
class CommonSettings:
    """The settings of every TTT variant.

    Attributes:
        chunk_size: tokens (12.5 Hz frames for Moshi) per fast-weight update. Chunk ``i`` is computed
            with ``W^(i-1)``; its update only helps later chunks. 512 follows the paper's ablation.
        eta: the TTT learning rate in ``W^(i) = W^(i-1) + eta * V[i]^T Z[i]``. Its useful range
            depends on the scale of ``Z`` and ``V``; sweep it on a log scale. For ``variant: mlp`` it
            is the base inner learning rate: token ``t``'s rate is ``eta * sigmoid(x_t w + b) / head_dim``
            (ttt-lm-pytorch's ``ttt_base_lr``, 1.0 there).
        eta_layers: per-layer eta, ``{main-transformer layer index: eta}``, used instead of ``eta``
            for the layers it lists (the same units: raw, or ``zsq`` per In-Place TTT's ``eta_norm``).
            A training run's ``ttt.eta: auto`` calibration writes it (``finetune``); every TTT layer's
            own ``config`` holds its resolved ``eta`` (:meth:`TTTConfig.layer_config`).
        layers: explicit main-transformer layer indices; overrides ``start_layer``/``layer_frequency``.
        start_layer, layer_frequency: select layers ``start_layer, start_layer + layer_frequency, ...``.
        variant: a name in :data:`moshi_ttt.variants.VARIANTS`: ``inplace`` (In-Place TTT: the MLP's
            ``w_down`` is the fast weight, :mod:`moshi_ttt.inplace`) or ``mlp`` (a TTT-MLP residual
            branch beside the MLP, :mod:`moshi_ttt.mlp`; ``chunk_size`` is its mini-batch, ``eta``
            its base inner learning rate).

    Fields marked ``fixed_on_resume`` in their metadata decide the TTT parameters; the others (chunk
    size, eta, ...) only how they are used, with one exception: TTT-MLP's learned per-position rate
    offsets have one entry per chunk position, so its ``chunk_size`` shapes a parameter (a resume that
    changes it is refused when the weights are loaded).
    """

    chunk_size: int = 512
    eta: float = 1e-2
    eta_layers: dict[int, float] | None = None
    layers: list[int] | None = field(default=None, metadata=FIXED_ON_RESUME)
    start_layer: int = field(default=0, metadata=FIXED_ON_RESUME)
    layer_frequency: int = field(default=6, metadata=FIXED_ON_RESUME)
    variant: str = field(default="inplace", metadata=FIXED_ON_RESUME)

    def check(self) -> None:
        if not is_int(self.chunk_size) or self.chunk_size < 1:
            raise setting_error(self, "chunk_size", "must be an integer >= 1")
        if (
            isinstance(self.eta, bool)
            or not isinstance(self.eta, (int, float))
            or not math.isfinite(self.eta)
        ):
            raise setting_error(self, "eta", "must be a finite number")
        if self.eta < 0:
            raise setting_error(self, "eta", "must be >= 0 (0 turns the fast-weight updates off)")
        if self.eta_layers is not None:
            self.eta_layers = _checked_eta_layers(self)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(is_int(i) for i in self.layers):
                raise setting_error(self, "layers", "must be a list of integer layer indices, or null")
            if len(self.layers) == 0:
                raise setting_error(
                    self, "layers", "must not be empty (disable TTT instead of selecting no layer)"
                )
            if len(set(self.layers)) != len(self.layers):
                raise setting_error(self, "layers", "contains duplicate indices")
            self.layers = sorted(int(i) for i in self.layers)
        if not is_int(self.start_layer) or self.start_layer < 0:
            raise setting_error(self, "start_layer", "must be an integer >= 0")
        if not is_int(self.layer_frequency) or self.layer_frequency < 1:
            raise setting_error(self, "layer_frequency", "must be an integer >= 1")
        if self.variant not in VARIANTS:
            raise setting_error(self, "variant", f"must be one of {', '.join(VARIANTS)}")


def _checked_eta_layers(config: CommonSettings) -> dict[int, float]:
    """``eta_layers`` with integer keys and float values (JSON, the TTT file's metadata, writes the
    keys as strings); an invalid entry raises the setting's error."""
    if not isinstance(config.eta_layers, dict):
        raise setting_error(config, "eta_layers", "must map layer indices to etas, or be null")
    out = {}
    for k, v in config.eta_layers.items():
        if isinstance(k, str) and k.lstrip("-").isdigit():
            k = int(k)
        if not is_int(k):
            raise setting_error(config, "eta_layers", f"key {k!r} is not a layer index")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise setting_error(config, "eta_layers", f"layer {k}: eta must be a finite number >= 0")
        out[k] = float(v)
    return out


def variant_settings() -> tuple[type[VariantSettings], ...]:
    """The registered variants' settings classes, in registry order, each once."""
    return tuple(dict.fromkeys(cls.SETTINGS for cls in VARIANTS.values()))


def _check_names(classes: tuple[type, ...]) -> None:
    seen: dict[str, str] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name in seen and seen[f.name] != cls.__name__:
                raise TypeError(f"TTT setting {f.name!r} is declared by {seen[f.name]} and {cls.__name__}")
            seen.setdefault(f.name, cls.__name__)


_check_names((CommonSettings, *variant_settings()))


# The bases in reverse registry order: a dataclass's fields run from its last base to its first, so
# the common settings come first (``TTTConfig(512, 0.01)`` is chunk_size, eta) and each variant's own
# follow in registry order.
@dataclass
class TTTConfig(*reversed(variant_settings()), CommonSettings):
    """Settings of the TTT layers of a Moshi model: :class:`CommonSettings` plus each registered
    variant's own settings (``SETTINGS`` of its layer class: :class:`moshi_ttt.inplace.InPlaceSettings`,
    :class:`moshi_ttt.mlp.TTTMLPSettings`). Invalid values raise ``ValueError`` naming the field."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        CommonSettings.check(self)
        for settings in variant_settings():
            if isinstance(self, settings):  # a variant registered later: config_class() has its settings
                settings.check(self)

    def layer_config(self, layer: int) -> TTTConfig:
        """The config TTT layer ``layer`` runs with: this one, with ``eta`` from ``eta_layers`` when
        it lists the layer."""
        if not self.eta_layers or layer not in self.eta_layers:
            return self
        return dataclasses.replace(self, eta=self.eta_layers[layer], eta_layers=None)

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The main-transformer layer indices that become TTT layers in a model of ``num_layers``."""
        if self.layers is not None:
            out_of_range = [i for i in self.layers if not -num_layers <= i < num_layers]
            if out_of_range:
                raise ValueError(
                    f"TTTConfig.layers: indices {out_of_range} are out of range for a transformer with "
                    f"{num_layers} layers (valid: 0..{num_layers - 1}, or negative from the end)"
                )
            return sorted({i % num_layers for i in self.layers})
        if self.start_layer >= num_layers:
            raise ValueError(
                f"TTTConfig.start_layer: {self.start_layer} is out of range for a transformer with "
                f"{num_layers} layers (valid: 0..{num_layers - 1})"
            )
        return list(range(self.start_layer, num_layers, self.layer_frequency))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TTTConfig:
        """The config of a dict of settings (a TTT file's metadata), with the settings of every variant
        registered now (:func:`config_class`)."""
        target = config_class() if cls is TTTConfig else cls
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TTTConfig: unknown keys {unknown}; allowed keys: {sorted(known)}")
        return target(**d)

    @classmethod
    def from_json(cls, s: str) -> TTTConfig:
        return cls.from_dict(json.loads(s))


def config_class() -> type[TTTConfig]:
    """:class:`TTTConfig`, or, when a variant was registered in :data:`~moshi_ttt.variants.VARIANTS`
    after it was built (at run time rather than in ``variants.py``), a subclass with that variant's
    settings too: ``config_class()(variant="mine", my_setting=...)``. TTT files load through it."""
    extra = tuple(s for s in variant_settings() if not issubclass(TTTConfig, s))
    return _extended(extra) if extra else TTTConfig


@functools.cache
def _extended(extra: tuple[type[VariantSettings], ...]) -> type[TTTConfig]:
    _check_names((TTTConfig, *extra))
    return dataclass(type("TTTConfig", (*reversed(extra), TTTConfig), {"__module__": __name__}))


__all__ = [
    "ETA_NORMS",
    "FAST_FORMS",
    "TARGET_SOURCES",
    "UPDATE_PRECISIONS",
    "WRITE_GATE_INPUTS",
    "CommonSettings",
    "TTTConfig",
    "config_class",
    "variant_settings",
]
