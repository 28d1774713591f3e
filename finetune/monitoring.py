"""Console progress, ``metrics.jsonl``, Weights & Biases (rank 0 only) and the TTT layers' telemetry."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from moshi_ttt import ttt_gatings

logger = logging.getLogger("finetune")


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float as None: metrics.jsonl is strict JSON (no NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


class Metrics:
    """Appends one JSON object per event to ``run_dir/metrics.jsonl`` and mirrors it to wandb.

    Each line is strict JSON (a non-finite value is written as null; ``skip`` records mark the steps
    whose loss or gradient was not finite). A run that starts at step S (0, or the step it resumes from)
    first moves every record after S (and any unreadable line, e.g. one cut by a kill) into
    ``metrics.superseded.jsonl``, then writes a ``start`` record: the file holds each step once, in the
    history of the checkpoints that exist.
    """

    def __init__(self, run_dir: Path, enabled: bool, wandb_run=None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = wandb_run

    def start(self, step: int, resumed_from: str | None) -> None:
        if not self.enabled:
            return
        if self.path.is_file():
            keep, drop = [], []
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    ok = int(json.loads(line)["step"]) <= step
                except (ValueError, KeyError, TypeError):
                    ok = False
                (keep if ok else drop).append(line + "\n")
            if drop:
                with (self.path.parent / "metrics.superseded.jsonl").open("a") as f:
                    f.writelines(drop)
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(keep))
                os.replace(tmp, self.path)
                logger.info(
                    "metrics.jsonl: %d record(s) after step %d moved to metrics.superseded.jsonl",
                    len(drop),
                    step,
                )
        self._write({"kind": "start", "step": step, "time": time.time(), "resumed_from": resumed_from})

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_strict(record), allow_nan=False) + "\n")

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"kind": kind, "step": step, "time": time.time(), **values})
        if self.wandb_run is not None:
            self.wandb_run.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)


def sweep_agent_run_id() -> str | None:
    """The run id a wandb sweep agent gave this process (the agent sets ``WANDB_SWEEP_ID`` and
    ``WANDB_RUN_ID`` before it launches a run), or None outside an agent."""
    if not os.environ.get("WANDB_SWEEP_ID"):
        return None
    return os.environ.get("WANDB_RUN_ID") or None


def init_wandb(cfg, run_dir: Path, run_id: str | None, config_dict: dict[str, Any]):
    """Start (or resume, with the saved ``run_id``) a wandb run; None when wandb is not configured.
    Under a sweep agent the run is the agent's (the caller passes its id) and starts even if
    ``wandb.project`` is unset: wandb then takes the project the agent set (``WANDB_PROJECT``)."""
    w = cfg.wandb
    if w.mode == "disabled" or (w.project is None and sweep_agent_run_id() is None):
        return None
    import wandb

    if w.mode == "online" and not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").exists():
        logger.warning("wandb.mode is online but WANDB_API_KEY is not set; wandb will ask or fail to log in")
    return wandb.init(
        project=w.project,
        entity=w.entity,
        name=w.run_name or run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=w.mode,
        tags=w.tags or None,
        config=config_dict,
    )


def ttt_telemetry(base) -> dict[str, float]:
    """Per TTT layer: what its variant reports (``moshi_ttt.layer.TELEMETRY``, e.g. In-Place TTT's
    ``||w_down - w_down_pretrained||``, the TTT term relative to the base term, one chunk's update
    relative to ``||W^(0)||``)."""
    return {f"ttt/layer{i}/{k}": v for i, g in ttt_gatings(base).items() for k, v in g.telemetry().items()}


# Console names of the telemetry a user reads to see whether TTT is off (~1e-6), acting (~1) or swamping (tens).
_CONSOLE_TTT = {"term_ratio": "ttt/base", "chunk_update_ratio": "dW/W0"}


def ttt_console_line(values: dict[str, Any]) -> str | None:
    """``ttt/base L1 3.1e-03 L3 8.0e-03 | dW/W0 L1 ...`` from the logged telemetry, or None."""
    parts = []
    for key, label in _CONSOLE_TTT.items():
        cells = [
            f"L{name.split('/')[1].removeprefix('layer')} {v:.1e}"
            for name, v in values.items()
            if name.startswith("ttt/layer") and name.endswith("/" + key)
        ]
        if cells:
            parts.append(f"{label} " + " ".join(cells))
    return " | ".join(parts) or None
