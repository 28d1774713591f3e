"""``ttt.eta: auto``: the trainer's choice of each TTT layer's eta after a short warm-up.

After ``ttt.eta_auto.steps`` training steps at the warm-up eta, every TTT layer's eta is rescaled so
that its ``ttt/base`` (the TTT term relative to the base term, the training telemetry's
``term_ratio``) on the first training batches lands on ``ttt.eta_auto.target``. The choice
(:class:`EtaCalibration`) is logged and saved in checkpoints; a resumed run reuses it.
``scripts/probe_eta.py`` (:mod:`finetune.research.eta_probe`) reports the same ratios over an eta grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moshi_ttt import set_ttt_eta, ttt_layers

# eta: auto refuses a rescale beyond this factor either way: the measurement is then not to be trusted
# (a target path that has barely opened, a layer already swamped).
MAX_ETA_FACTOR = 1e4


def dataset_batches(dataset, n: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``n`` batches of ``batch_size`` valid items of ``dataset``, in index order (the same
    on every call and every process: nothing of the training loader's state is used)."""
    out: list[torch.Tensor] = []
    items: list[torch.Tensor] = []
    for i in range(len(dataset)):
        x = dataset[i]
        if x is None:  # unreadable item, as the loader skips it
            continue
        items.append(x)
        if len(items) == batch_size:
            out.append(torch.stack(items))
            items = []
            if len(out) == n:
                break
    if not out:
        raise ValueError(f"the training data has fewer than {batch_size} valid items (one batch)")
    return out


@dataclass
class EtaCalibration:
    """What ``ttt.eta: auto`` chose, at which step, from which measurement (saved in checkpoints)."""

    step: int
    start: float  # the warm-up's eta
    target: float  # the ttt/base aimed at
    ratios: dict[int, float]  # ttt/base per TTT layer at ``start``, measured at ``step``
    etas: dict[int, float]  # the chosen eta per TTT layer
    final_ratios: dict[int, float]  # ttt/base per TTT layer at the chosen etas, same weights and batches

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> EtaCalibration:
        def layers(m: dict) -> dict[int, float]:
            return {int(k): float(v) for k, v in m.items()}

        return cls(
            step=int(d["step"]),
            start=float(d["start"]),
            target=float(d["target"]),
            ratios=layers(d["ratios"]),
            etas=layers(d["etas"]),
            final_ratios=layers(d["final_ratios"]),
        )

    def describe(self) -> str:
        def row(m: dict[int, float]) -> str:
            return ", ".join(f"L{i} {v:.3g}" for i, v in m.items())

        return (
            f"ttt/base at eta {self.start:g}: {row(self.ratios)} -> eta {row(self.etas)}, "
            f"ttt/base {row(self.final_ratios)} (target {self.target:g})"
        )


@torch.no_grad()
def measure_term_ratio(
    lm: torch.nn.Module, batches: Sequence[torch.Tensor], autocast=contextlib.nullcontext
) -> dict[int, float]:
    """``ttt/base`` (``term_ratio``) of every TTT layer of ``lm`` at its current settings, mean over
    ``batches`` (no gradient, eval mode; the training mode is restored)."""
    layers = ttt_layers(lm)
    if not layers:
        raise ValueError("the model has no TTT layers")
    was_training = lm.training
    dev = next(lm.parameters()).device
    sums = dict.fromkeys(layers, 0.0)
    lm.eval()
    try:
        for codes in batches:
            for g in layers.values():
                g.record_stats = True
            with autocast():
                lm(codes.to(dev))
            for i, g in layers.items():
                sums[i] += g.telemetry().get("term_ratio", math.nan) / len(batches)
    finally:
        for g in layers.values():
            g.record_stats = False
        lm.train(was_training)
    return sums


def eta_from_ratios(
    ratios: dict[int, float], etas: dict[int, float], target: float, per_layer: bool = True
) -> dict[int, float]:
    """The eta per layer that puts ``ttt/base`` at ``target``, from ``ratios`` measured at ``etas``
    (a layer's ``ttt/base`` is linear in its eta for given inputs): ``eta x target / ratio`` per
    layer, or, without ``per_layer``, one eta for every layer from the layers' mean ratio (the etas
    given are then equal)."""
    bad = {i: r for i, r in ratios.items() if not (math.isfinite(r) and r > 0)}
    if bad:
        layers = ", ".join(f"L{i} {r}" for i, r in bad.items())
        raise ValueError(
            f"ttt.eta: auto cannot calibrate: ttt/base is {layers}, so no eta reaches {target:g}. The TTT "
            "target path has not opened (TTT parameters frozen, or a tiny optim.ttt_params_lr), or no "
            "update reaches a later chunk (windows shorter than 2 chunks). Raise ttt.eta_auto.steps, fix "
            "that, or set ttt.eta by hand"
        )
    if per_layer:
        return {i: etas[i] * target / r for i, r in ratios.items()}
    mean = sum(ratios.values()) / len(ratios)
    return {i: etas[i] * target / mean for i in ratios}


def calibrate_eta(
    lm: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    start: float,
    target: float,
    *,
    per_layer: bool = True,
    rounds: int = 3,
    step: int = 0,
    autocast=contextlib.nullcontext,
) -> EtaCalibration:
    """Set the eta of every TTT layer of ``lm`` so that its ``ttt/base`` on ``batches`` is
    ``target`` (no training: the weights stay as they are). A layer's ratio is linear in its own
    eta, but a deeper layer's input moves with the etas below it, so the rescale is repeated
    ``rounds`` times (each a forward over ``batches``) from ``start`` on every layer."""
    etas = dict.fromkeys(ttt_layers(lm), float(start))
    set_ttt_eta(lm, etas)
    first = None
    for _ in range(rounds):
        ratios = measure_term_ratio(lm, batches, autocast)
        first = first or ratios
        etas = eta_from_ratios(ratios, etas, target, per_layer)
        for i, e in etas.items():
            if not 1 / MAX_ETA_FACTOR <= e / start <= MAX_ETA_FACTOR:
                raise ValueError(
                    f"ttt.eta: auto: layer {i} would need eta {e:.3g}, {e / start:.3g} x the warm-up's "
                    f"{start:g} (ttt/base {first[i]:.3g} at {start:g}, target {target:g}); beyond "
                    f"{MAX_ETA_FACTOR:g}x the measurement is not to be trusted: set ttt.eta_auto.start "
                    "nearer, or ttt.eta by hand"
                )
        set_ttt_eta(lm, etas)
    final = measure_term_ratio(lm, batches, autocast)
    return EtaCalibration(step, float(start), float(target), first, etas, final)
