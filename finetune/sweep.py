"""Grid sweeps over training settings (``scripts/sweep.py``).

A sweep file::

    base: configs/recall_tiny.yaml          # the training config every run starts from
    out_dir: runs/sweeps/recall_tiny        # run k lives in out_dir/<name from its overrides>
    overrides: {max_steps: 600}             # applied to every run
    grid:                                   # dotted keys -> values; the runs are the product
      ttt.chunk_size: [8, 16]
      ttt.eta: [0.001, 0.01, 0.1, 1.0, 10.0]
    metrics: [eval_recall_acc_far, eval_recall_acc_near, eval_loss]

``grid`` may also be a list of such mappings: the runs are then the union of their products, for
settings that only make sense together (a key that one variant ignores need not multiply its runs)::

    grid:
      - {ttt.variant: [inplace], ttt.eta: [0.01, 0.1], ttt.target_source: [text_emb, hidden]}
      - {ttt.variant: [mlp], ttt.eta: [0.01, 0.1]}

Runs are named from their grid values (``chunk_size=8,eta=0.001``), so the same grid always maps to
the same directories: a finished run (a checkpoint at its ``max_steps``) is skipped, an interrupted
one resumes from its newest checkpoint (the trainer's ``resume: auto``).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .args import load_config
from .checkpointing import list_checkpoints
from .schema import ConfigError


@dataclass
class Run:
    name: str
    params: dict[str, Any]  # grid values of this run
    overrides: dict[str, Any]  # everything passed to train.py (fixed overrides + grid + run_dir)
    run_dir: Path


@dataclass
class Sweep:
    base: Path
    out_dir: Path
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]]
    overrides: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: ["eval_loss"])

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(data) - {"base", "out_dir", "grid", "overrides", "metrics"})
        if unknown:
            raise ConfigError(
                f"{path}: unknown sweep keys {unknown}; allowed: base, out_dir, grid, overrides, metrics"
            )
        grid = data.get("grid")
        grids = grid if isinstance(grid, list) else [grid]
        if not grids or not all(isinstance(g, dict) and g for g in grids):
            raise ConfigError(
                f"{path}: 'grid' must map dotted config keys to lists of values (or be a list of such maps)"
            )
        for g in grids:
            for k, v in g.items():
                if not isinstance(v, list) or not v:
                    raise ConfigError(f"{path}: grid.{k} must be a non-empty list of values")
        base = Path(data.get("base", ""))
        if not base.is_file() and (path.parent / base).is_file():
            base = path.parent / base
        if not base.is_file():
            raise ConfigError(f"{path}: base config {data.get('base')!r} not found")
        sweep = cls(
            base=base,
            out_dir=Path(data.get("out_dir") or f"runs/sweeps/{path.stem}"),
            grid=data["grid"],
            overrides=data.get("overrides") or {},
            metrics=data.get("metrics") or ["eval_loss"],
        )
        runs = sweep.runs()
        dup = sorted({r.name for r in runs if sum(x.name == r.name for x in runs) > 1})
        if dup:
            raise ConfigError(f"{path}: the grids produce the same run more than once: {', '.join(dup)}")
        for run in runs:  # every run's config must be valid before anything starts
            load_config(sweep.base, run.overrides)
        return sweep

    @property
    def grids(self) -> list[dict[str, list[Any]]]:
        return self.grid if isinstance(self.grid, list) else [self.grid]

    @property
    def keys(self) -> list[str]:
        """Every grid key, in order of first appearance."""
        return list(dict.fromkeys(k for g in self.grids for k in g))

    def runs(self) -> list[Run]:
        short = _short_names(self.keys)
        out = []
        for grid in self.grids:
            keys = list(grid)
            for values in itertools.product(*(grid[k] for k in keys)):
                params = dict(zip(keys, values))
                name = ",".join(f"{short[k]}={_fmt(v)}" for k, v in params.items())
                run_dir = self.out_dir / _safe(name)
                overrides = {**self.overrides, **params, "run_dir": str(run_dir)}
                out.append(Run(name, params, overrides, run_dir))
        return out

    FAILED_MARKER = "sweep_failed.json"  # written when a run's trainer exits non-zero
    STOP_FILE = "STOP"  # out_dir/STOP: launchers finish their current run, then start no other

    def status(self, run: Run) -> str:
        """``done``, ``failed (exit N)`` (its last attempt failed: diverged, crashed), ``partial``
        (has checkpoints, resumable) or ``new``. Every run but a done one runs again on re-run."""
        ckpts = list_checkpoints(run.run_dir)
        if ckpts and ckpts[-1][0] >= load_config(self.base, run.overrides).max_steps:
            return "done"
        marker = run.run_dir / self.FAILED_MARKER
        if marker.exists():
            try:
                code = json.loads(marker.read_text())["exit_code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
            return f"failed (exit {code})"
        return "partial" if ckpts else "new"

    def command(self, run: Run, nproc: int = 1, python: str = sys.executable) -> list[str]:
        launcher = (
            [python] if nproc <= 1 else [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        )
        args = [f"--{k}={_cli_value(v)}" for k, v in run.overrides.items()]
        return [*launcher, "train.py", str(self.base), *args]

    def run_all(
        self,
        runner: Callable[[Run], int],
        log: Callable[[str], None] = print,
        shard: tuple[int, int] = (0, 1),
    ) -> dict[str, str]:
        """Run every unfinished run in order; ``shard = (k, n)`` takes only runs ``k, k + n, ...``,
        so ``n`` processes given ``k = 0 .. n-1`` share a grid without running any run twice."""
        k, n = shard
        if not 0 <= k < n:
            raise ConfigError(f"shard {k}/{n}: expected K/N with 0 <= K < N")
        results = {}
        runs = self.runs()
        for i, run in enumerate(runs, 1):
            if (i - 1) % n != k:
                continue
            if (self.out_dir / self.STOP_FILE).exists():
                log(
                    f"{self.out_dir / self.STOP_FILE} exists: stopping before {run.name} (remove it to go on)"
                )
                break
            state = self.status(run)
            if state == "done":
                log(f"[{i}/{len(runs)}] {run.name}: finished, skipped")
                results[run.name] = "skipped"
                continue
            log(f"[{i}/{len(runs)}] {run.name}: {'resuming' if state == 'partial' else 'starting'}")
            marker = run.run_dir / self.FAILED_MARKER
            marker.unlink(missing_ok=True)
            code = runner(run)
            results[run.name] = "ok" if code == 0 else f"failed ({code})"
            if code != 0:
                run.run_dir.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"exit_code": code, "time": time.time()}) + "\n")
                log(
                    f"[{i}/{len(runs)}] {run.name}: failed with exit code {code} (see {run.run_dir}/train.log)"
                )
        return results

    def collect(self) -> list[dict[str, Any]]:
        """One row per run: its grid values, status and the last value of each metric."""
        rows = []
        for run in self.runs():
            row: dict[str, Any] = {"run": run.name}
            row.update({k: run.params.get(k) for k in self.keys})
            row["status"] = self.status(run)
            last = last_metrics(run.run_dir)
            for m in self.metrics:
                row[m] = last.get(m)
            rows.append(row)
        return rows

    def write_results(self, rows: list[dict[str, Any]]) -> list[Path]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cols = list(rows[0]) if rows else []
        csv_path, md_path = self.out_dir / "results.csv", self.out_dir / "results.md"
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        md_path.write_text(markdown_table(rows, cols))
        paths = [csv_path, md_path]
        png = self.plot(rows)
        if png is not None:
            paths.append(png)
        return paths

    def plot(self, rows: list[dict[str, Any]]) -> Path | None:
        """The first metric against the first numeric grid key, one line per other setting."""
        values = {k: [v for g in self.grids for v in g.get(k, [])] for k in self.keys}
        numeric = [
            k
            for k in self.keys
            if all(k in g for g in self.grids) and all(isinstance(v, (int, float)) for v in values[k])
        ]
        if not rows or not numeric:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x_key = "ttt.eta" if "ttt.eta" in numeric else numeric[0]
        metric = self.metrics[0]
        others = [k for k in self.keys if k != x_key]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups: dict[tuple, list[tuple[float, float]]] = {}
        for r in rows:
            if r.get(metric) is None:
                continue
            groups.setdefault(tuple(r.get(k) for k in others), []).append((r[x_key], r[metric]))
        for key, pts in sorted(groups.items(), key=lambda kv: str(kv[0])):
            pts.sort()
            short = _short_names(others)
            label = ", ".join(f"{short[k]}={v}" for k, v in zip(others, key) if v is not None) or metric
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if x_key == "ttt.eta" or all(v > 0 for v in values[x_key]):
            ax.set_xscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(metric)
        ax.set_title(f"{self.out_dir.name}: {metric}")
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = self.out_dir / "results.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def wandb_sweep(self) -> dict[str, Any]:
        """A wandb sweep definition (grid) that launches train.py with the same overrides."""
        if len(self.grids) > 1:
            raise ConfigError(
                "a wandb grid sweep is a single product of values; this file lists "
                f"{len(self.grids)} grids: export each as its own sweep file"
            )
        params = {k: {"values": v} for k, v in self.grids[0].items()}
        params.update({k: {"value": v} for k, v in self.overrides.items()})
        return {
            "program": "train.py",
            "method": "grid",
            "name": self.out_dir.name,
            "metric": {"name": f"eval/{self.metrics[0].removeprefix('eval_')}", "goal": "maximize"},
            "parameters": params,
            "command": ["${env}", "${interpreter}", "${program}", str(self.base), "${args}"],
        }


def _records(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The train and eval records of ``run_dir/metrics.jsonl``, each key named as in :func:`last_metrics`."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        prefix = "eval_" if r.get("kind") == "eval" else ""
        if r.get("kind") in ("train", "eval"):
            yield {prefix + k: v for k, v in r.items() if k not in ("kind", "time")}


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The latest value of every logged metric: ``eval_<name>`` for eval records, ``<name>`` for train."""
    out: dict[str, Any] = {}
    for r in _records(run_dir):
        out.update(r)
    return out


def metric_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every record of ``metric`` (named as in :func:`last_metrics`), in step order;
    a step logged twice (a resumed run) keeps its latest value, a null (non-finite) value is left out."""
    points: dict[int, float] = {}
    step_key = "eval_step" if metric.startswith("eval_") else "step"
    for r in _records(run_dir):
        if r.get(metric) is not None and r.get(step_key) is not None:
            points[int(r[step_key])] = float(r[metric])
    return sorted(points.items())


def markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def subprocess_runner(sweep: Sweep, nproc: int = 1, cwd: str | Path = ".") -> Callable[[Run], int]:
    def run(r: Run) -> int:
        r.run_dir.mkdir(parents=True, exist_ok=True)
        with (r.run_dir / "train.log").open("a") as log:
            return subprocess.run(
                sweep.command(r, nproc), cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            ).returncode

    return run


def _short_names(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    return str(v)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9=,._+-]", "_", name)


def _cli_value(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
