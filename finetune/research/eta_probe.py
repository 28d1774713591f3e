"""Choose the TTT learning rate before a long run (``scripts/probe_eta.py``).

Runs a model (a training config's model: tiny, or a Moshi checkpoint; or a run's checkpoint) over a
few batches of the config's training data, once per ``(eta_norm, eta)``, and reports per TTT layer
the training telemetry (``moshi_ttt.layer.TELEMETRY``): the TTT term relative to the base term and
one chunk's update relative to ``||W^(0)||``. Around 1e-6 TTT is effectively off; around 1 it acts
beside the base term; tens swamp the layer (docs/long_context.md, "Choosing eta", has the recall grid's bands).

At initialisation the In-Place target path gives ``V = 0``, so every ratio is 0 whatever eta is.
The probe then opens it (``TTTLayer.probe_init``: the conv's identity tap, ``V = X_src``) and says
so; the ratios scale linearly with ``||V||``, which training grows from 0, so probing a run's
checkpoint after a few hundred steps tells what eta does to the trained target path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moshi_ttt import named_ttt_layers

from ..args import TrainConfig, load_config
from ..training.eta_auto import dataset_batches

logger = logging.getLogger("finetune")

RATIOS = ("term_ratio", "chunk_update_ratio")


@dataclass
class ProbeResult:
    source: str  # what was probed (config or checkpoint)
    target: str  # how the target path was set
    batches: int
    batch_size: int
    num_frames: int
    chunk_size: int
    layers: list[str]
    z_sq_mean: dict[str, float]  # per layer, mean over the batches (does not depend on eta)
    rows: list[dict[str, Any]] = field(default_factory=list)  # eta_norm, eta, {stat: {layer: value}}


def load_probe_model(
    path: str | Path, overrides: dict[str, Any] | None, device: torch.device
) -> tuple[torch.nn.Module, TrainConfig, str]:
    """The model and config to probe: a training config (its model source, random TTT init) or a
    run / checkpoint directory (its trained weights); ``overrides`` apply to the config either way."""
    path = Path(path)
    if path.is_dir():
        from ..serving.inference import load_checkpoint_model

        loaded = load_checkpoint_model(path, device=device, with_codec=False)
        cfg = load_config(loaded.checkpoint / "config.yaml", overrides)
        return loaded.lm, cfg, f"checkpoint {loaded.checkpoint}"
    from ..training.model import build_model

    cfg = load_config(path, overrides)
    if not cfg.ttt.enabled:
        raise ValueError(f"{path}: ttt.enabled is false; the probe needs TTT layers")
    return build_model(cfg, device).model, cfg, f"config {path} ({cfg.model.source} weights, new TTT layers)"


def probe_batches(cfg: TrainConfig, lm: torch.nn.Module, n: int, batch_size: int) -> list[torch.Tensor]:
    from ..data.build import build_datasets

    train_set, _ = build_datasets(cfg, lm)
    return dataset_batches(train_set, n, batch_size)


@torch.no_grad()
def probe(
    lm: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    etas: Sequence[float],
    eta_norms: Sequence[str] = ("none", "zsq"),
    *,
    chunk_size: int | None = None,
    open_target: bool = True,
    source: str = "model",
) -> ProbeResult:
    """Telemetry of every TTT layer of ``lm`` over ``batches`` for each ``(eta_norm, eta)``. With
    ``open_target``, layers whose TTT term is zero by construction are opened first
    (``TTTLayer.probe_init``). ``eta_norms`` a variant does not accept are skipped."""
    layers = dict(named_ttt_layers(lm))
    if not layers:
        raise ValueError("the model has no TTT layers")
    names = {n: f"L{n.split('.')[-2]}" if n.split(".")[-2].isdigit() else n for n in layers}
    opened = [n for n, g in layers.items() if open_target and g.probe_init()]
    if opened:
        target = "identity tap (V = X_src): the target path was at its zero init, where V = 0"
    else:
        target = "as loaded"
    original = {n: g.config for n, g in layers.items()}
    C = chunk_size or next(iter(original.values())).chunk_size
    lm.eval()
    dev = next(lm.parameters()).device
    res = ProbeResult(
        source,
        target,
        len(batches),
        batches[0].shape[0],
        batches[0].shape[-1],
        C,
        list(names.values()),
        {},
    )
    try:
        for norm in eta_norms:
            for eta in etas:
                try:
                    for n, g in layers.items():
                        g.config = dataclasses.replace(original[n], eta=eta, eta_norm=norm, chunk_size=C)
                except ValueError:
                    break  # this variant has no such eta_norm
                sums: dict[str, dict[str, float]] = {}
                for codes in batches:
                    for g in layers.values():
                        g.record_stats = True
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                        lm(codes.to(dev))
                    for n, g in layers.items():
                        for k, v in g.telemetry().items():
                            sums.setdefault(k, {}).setdefault(names[n], 0.0)
                            sums[k][names[n]] += v / len(batches)
                res.z_sq_mean = res.z_sq_mean or sums.get("z_sq_mean", {})
                res.rows.append({"eta_norm": norm, "eta": eta, **{k: sums.get(k, {}) for k in RATIOS}})
    finally:
        for n, g in layers.items():
            g.config = original[n]
            g.record_stats = False
    return res


def _e(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.1e}"


def to_text(res: ProbeResult) -> str:
    """The probe's report: one row per ``(eta_norm, eta)``, one column per layer and ratio."""
    L = res.layers
    complete = res.num_frames // res.chunk_size
    lines = [
        f"probe of {res.source}",
        f"{res.batches} batch(es) of {res.batch_size} x {res.num_frames} steps, chunk {res.chunk_size} "
        f"({complete} complete chunk(s) per sequence); target path: {res.target}",
    ]
    if complete < 2:
        lines.append(
            "warning: fewer than 2 complete chunks per sequence: no update reaches a later chunk; "
            "use longer windows (data.duration_sec) or a smaller chunk (--chunk-size)"
        )
    if res.z_sq_mean:
        zs = "  ".join(f"{n} {_e(res.z_sq_mean.get(n))}" for n in L)
        lines.append(f"mean ||z||^2 per layer: {zs}   (raw eta e <-> eta_norm zsq eta e x mean ||z||^2)")
    lines += [
        "ttt/base: ||TTT term|| / ||base term Z W0^T||;  dW/W0: one chunk's update / ||W0||",
        "(about 1e-6: TTT effectively off; about 1: beside the base term; tens: the TTT term swamps the layer)",
        "",
    ]
    w = max(9, 8 * len(L))
    head = f"{'eta_norm':8s} {'eta':>8s} | {'ttt/base ' + ' '.join(L):<{w}s} | {'dW/W0 ' + ' '.join(L)}"
    lines += [head, "-" * len(head)]
    for r in res.rows:
        a = " ".join(_e(r["term_ratio"].get(n)) for n in L)
        b = " ".join(_e(r["chunk_update_ratio"].get(n)) for n in L)
        lines.append(f"{r['eta_norm']:8s} {r['eta']:>8g} | {a:<{w}s} | {b}")
    return "\n".join(lines)
