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
one resumes from its newest checkpoint (the trainer's ``resume: auto``), and a directory that holds
another point's run (its ``config.yaml`` differs in a swept key) is refused, never continued.

Every way of running a sweep goes through the same points, numbered 0..N-1 in file order: the local
runner (:meth:`Sweep.run_all`), one point by index (:meth:`Sweep.run_point`: a job array, or the wandb
agent's entry point ``scripts/sweep_point.py``, which also finds a point from its swept values), and
the printed commands. The sweep's objective for wandb is ``metric`` (default: the first of
``metrics``) with ``goal`` (default: minimise a loss / NLL / perplexity, maximise an accuracy)::

    metric: eval/recall_acc_far       # or eval_recall_acc_far; train/loss or loss for a train value
    goal: maximize
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..args import load_config, saved_config_with_defaults
from ..schema import ConfigError, get_dotted, to_dict
from ..training.checkpointing import list_checkpoints

# The wandb agent's program (relative to the repository root, where `wandb agent` is started): it
# rebuilds a point from the agent's arguments and trains it in that point's run directory.
WANDB_PROGRAM = "scripts/sweep_point.py"
GOALS = ("minimize", "maximize")
_MINIMISE = {"loss", "nll", "ppl", "perplexity"}
_MAXIMISE = {"acc", "accuracy"}


def local_metric_name(name: str) -> str:
    """A metric as :func:`last_metrics` names it: ``eval/x`` -> ``eval_x``, ``train/x`` -> ``x``."""
    if name.startswith("eval/"):
        return "eval_" + name[len("eval/") :]
    if name.startswith("train/"):
        return name[len("train/") :]
    return name


def wandb_metric_name(name: str) -> str:
    """A metric as the trainer logs it to wandb (``eval/<key>``, ``train/<key>``)."""
    name = local_metric_name(name)
    return f"eval/{name[len('eval_') :]}" if name.startswith("eval_") else f"train/{name}"


def default_goal(name: str) -> str | None:
    """``minimize`` for a loss, NLL or perplexity, ``maximize`` for an accuracy, None if the name says
    neither (or both)."""
    words = set(re.split(r"[_/]", name))
    low, high = bool(words & _MINIMISE), bool(words & _MAXIMISE)
    return "minimize" if low and not high else "maximize" if high and not low else None


@dataclass
class Run:
    name: str
    params: dict[str, Any]  # grid values of this run
    overrides: dict[str, Any]  # everything passed to train.py (fixed overrides + grid + run_dir)
    run_dir: Path
    index: int = 0  # the point's number in the sweep, 0..N-1 in file order (--array-index, --point)


@dataclass
class Sweep:
    base: Path
    out_dir: Path
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]]
    overrides: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: ["eval_loss"])
    metric: str = ""  # the objective (local name, see last_metrics); "" = metrics[0]
    goal: str = ""  # minimize | maximize; "" = from the metric's name (loss / NLL / ppl down, accuracy up)
    _resolved: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    KEYS = ("base", "out_dir", "grid", "overrides", "metrics", "metric", "goal")

    def __post_init__(self) -> None:
        self.metric = local_metric_name(self.metric or self.metrics[0])
        if self.metric not in self.metrics:
            self.metrics = [*self.metrics, self.metric]
        if self.goal and self.goal not in GOALS:
            raise ConfigError(f"goal: {self.goal!r} is not allowed; choose minimize or maximize")
        self.goal = self.goal or default_goal(self.metric) or ""  # "": unknown, needed only to export

    def require_goal(self) -> str:
        """The goal, or a ConfigError asking for one (a metric whose name does not tell)."""
        if not self.goal:
            raise ConfigError(
                f"metric {self.metric}: cannot tell whether it should go up or down; "
                "add `goal: minimize` or `goal: maximize` to the sweep file"
            )
        return self.goal

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"{path}: unknown sweep keys {unknown}; allowed: {', '.join(cls.KEYS)}")
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
        metrics = data.get("metrics") or ["eval_loss"]
        if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
            raise ConfigError(f"{path}: 'metrics' must be a list of metric names (eval_loss, loss, ...)")
        metric = data.get("metric") or ""
        if not isinstance(metric, str) or (
            metric and not re.fullmatch(r"(eval/|train/)?\w[\w/.]*(?<![/.])", metric)
        ):
            raise ConfigError(f"{path}: 'metric' must name one metric, e.g. eval/recall_acc_far or eval/loss")
        base = Path(data.get("base", ""))
        if not base.is_file() and (path.parent / base).is_file():
            base = path.parent / base
        if not base.is_file():
            raise ConfigError(f"{path}: base config {data.get('base')!r} not found")
        try:
            sweep = cls(
                base=base,
                out_dir=Path(data.get("out_dir") or f"runs/sweeps/{path.stem}"),
                grid=data["grid"],
                overrides=data.get("overrides") or {},
                metrics=[local_metric_name(m) for m in metrics],
                metric=metric,
                goal=data.get("goal") or "",
            )
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
        runs = sweep.runs()
        dup = sorted({r.name for r in runs if sum(x.name == r.name for x in runs) > 1})
        if dup:
            raise ConfigError(f"{path}: the grids produce the same run more than once: {', '.join(dup)}")
        seen_dir: dict[Path, str] = {}
        seen_cfg: dict[str, str] = {}
        for run in runs:  # every run's config must be valid before anything starts
            if run.run_dir in seen_dir:
                raise ConfigError(
                    f"{path}: points {seen_dir[run.run_dir]} and {run.name} map to the same run directory "
                    f"{run.run_dir}; make their values differ in their printed form"
                )
            seen_dir[run.run_dir] = run.name
            resolved = {k: v for k, v in sweep.resolved(run).items() if k != "run_dir"}
            key = json.dumps(resolved, sort_keys=True, default=str)
            if key in seen_cfg:
                raise ConfigError(
                    f"{path}: points {seen_cfg[key]} and {run.name} train the same configuration "
                    "(the same values in another order, or a value equal to the base config's); drop one of them"
                )
            seen_cfg[key] = run.name
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
                out.append(Run(name, params, overrides, run_dir, len(out)))
        return out

    def resolved(self, run: Run) -> dict[str, Any]:
        """The point's full training config, as a nested dict (computed once per point; do not modify)."""
        key = json.dumps(run.overrides, sort_keys=True, default=str)
        if key not in self._resolved:
            self._resolved[key] = to_dict(load_config(self.base, run.overrides))
        return self._resolved[key]

    FAILED_MARKER = "sweep_failed.json"  # written when a run's trainer exits non-zero
    STOP_FILE = "STOP"  # out_dir/STOP: launchers finish their current run, then start no other

    def foreign(self, run: Run) -> str | None:
        """How ``run.run_dir`` holds another point's run (its saved config sets a swept key to another
        value than this point's), or None: a new directory, or this point's own run."""
        saved_file = run.run_dir / "config.yaml"
        if not saved_file.is_file():
            ckpts = list_checkpoints(run.run_dir)
            saved_file = ckpts[-1][1] / "config.yaml" if ckpts else saved_file
            if not saved_file.is_file():
                return None
        try:
            saved = saved_config_with_defaults(yaml.safe_load(saved_file.read_text()) or {})
        except (yaml.YAMLError, ConfigError, AttributeError) as e:
            return f"{saved_file} is not a readable config ({e})"
        mine = self.resolved(run)
        differ = [k for k in run.params if get_dotted(saved, k) != get_dotted(mine, k)]
        if not differ:
            return None
        return "a run with " + ", ".join(
            f"{k}={get_dotted(saved, k)!r} where this point has {get_dotted(mine, k)!r}" for k in differ
        )

    def status(self, run: Run) -> str:
        """``done``, ``failed (exit N)`` (its last attempt failed: diverged, crashed), ``partial``
        (has checkpoints, resumable), ``new``, or ``foreign`` (its directory holds another point's run:
        refused). Every run but a done one runs again on re-run."""
        if self.foreign(run):
            return "foreign"
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

    def command(
        self, run: Run, nproc: int = 1, python: str = sys.executable, program: str | Path = "train.py"
    ) -> list[str]:
        """The point's training command: ``python train.py BASE --key=value ... --run_dir=DIR``, under
        ``torch.distributed.run --standalone --nproc-per-node N`` when ``nproc`` > 1."""
        launcher = [python]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        args = [f"--{k}={_cli_value(v)}" for k, v in run.overrides.items()]
        return [*launcher, str(program), str(self.base), *args]

    def point(self, args: dict[str, Any]) -> Run:
        """The point a wandb agent (or a person) names: ``{"point": I}``, or its swept values
        (``{"ttt.eta": 0.01, "ttt.chunk_size": 8}``: exactly the keys of its grid); ConfigError if none."""
        runs = self.runs()
        if "point" in args:
            i, extra = args["point"], sorted(set(args) - {"point"})
            if extra:
                raise ConfigError(f"give either --point or the swept values, not both (also got {extra})")
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(runs):
                raise ConfigError(f"point {i!r}: this sweep has points 0..{len(runs) - 1}")
            return runs[i]
        unknown = sorted(set(args) - set(self.keys))
        if unknown:
            raise ConfigError(
                f"{', '.join(unknown)}: not swept by this file (its keys: {', '.join(self.keys)}); "
                "a point is named by its grid values or --point=I"
            )
        if not args:
            raise ConfigError(f"name a point: --point=I (0..{len(runs) - 1}) or its grid values")
        wanted = to_dict(load_config(self.base, {**self.overrides, **args}))
        for run in runs:
            if set(run.params) == set(args):
                mine = self.resolved(run)
                if all(get_dotted(mine, k) == get_dotted(wanted, k) for k in args):
                    return run
        same_keys = [r.name for r in runs if set(r.params) == set(args)]
        asked = ", ".join(f"{k}={v!r}" for k, v in args.items())
        if same_keys:
            raise ConfigError(
                f"no point of this sweep has {asked}; its points with these keys: {', '.join(same_keys)}"
            )
        grids = "; ".join(", ".join(g) for g in self.grids)
        raise ConfigError(
            f"no point of this sweep has exactly the keys of {asked}; give all the keys of one grid ({grids})"
        )

    def run_point(self, run: Run, runner: Callable[[Run], int], log: Callable[[str], None] = print) -> str:
        """Run one point unless it is done: ``skipped``, ``ok`` or ``failed (N)``. A directory that holds
        another point's run is refused (ConfigError), never resumed."""
        where = f"[{run.index}] {run.name}"
        state = self.status(run)
        if state == "foreign":
            raise ConfigError(
                f"{run.run_dir} holds {self.foreign(run)}: a sweep point never continues "
                "another point's run. Move that directory away (or give the sweep another out_dir) and "
                "launch the point again"
            )
        if state == "done":
            log(f"{where}: finished, skipped")
            return "skipped"
        log(f"{where}: {'resuming' if state == 'partial' else 'starting'} in {run.run_dir}")
        marker = run.run_dir / self.FAILED_MARKER
        marker.unlink(missing_ok=True)
        code = runner(run)
        if code == 0:
            return "ok"
        run.run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"exit_code": code, "time": time.time()}) + "\n")
        log(f"{where}: failed with exit code {code} (see {run.run_dir}/train.log)")
        return f"failed ({code})"

    def run_all(
        self,
        runner: Callable[[Run], int],
        log: Callable[[str], None] = print,
        shard: tuple[int, int] = (0, 1),
    ) -> dict[str, str]:
        """Every point in turn (:meth:`run_point`); a refused point is reported and the rest still run.
        ``shard = (k, n)`` takes only points ``k, k + n, ...``, so ``n`` launchers given ``k = 0 .. n-1``
        share a grid without running any point twice. A file ``out_dir/STOP`` ends the loop before the
        next point (the running one finishes)."""
        k, n = shard
        if not 0 <= k < n:
            raise ConfigError(f"shard {k}/{n}: expected K/N with 0 <= K < N")
        results = {}
        for run in self.runs():
            if run.index % n != k:
                continue
            if (self.out_dir / self.STOP_FILE).exists():
                log(
                    f"{self.out_dir / self.STOP_FILE} exists: stopping before {run.name} (remove it to go on)"
                )
                break
            try:
                results[run.name] = self.run_point(run, runner, log)
            except ConfigError as e:
                log(f"[{run.index}] {run.name}: refused: {e}")
                results[run.name] = "refused"
        return results

    def collect(self) -> list[dict[str, Any]]:
        """One row per run: its grid values, status and the last value of each metric."""
        rows = []
        for run in self.runs():
            row: dict[str, Any] = {"run": run.name}
            row.update({k: run.params.get(k) for k in self.keys})
            row["status"] = self.status(run)
            last = last_metrics(run.run_dir) if row["status"] != "foreign" else {}
            for m in self.metrics:
                row[m] = last.get(m)
            rows.append(row)
        return rows

    def best(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The row with the best value of the sweep's metric (by its goal), None if none has one."""
        scored = [r for r in rows if isinstance(r.get(self.metric), (int, float))]
        if not scored or not self.goal:
            return None
        pick = min if self.goal == "minimize" else max
        return pick(scored, key=lambda r: r[self.metric])

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

    def wandb_sweeps(
        self, sweep_file: str | Path, nproc: int = 1, split: bool = False
    ) -> list[dict[str, Any]]:
        """wandb sweep definitions (method grid) whose agent runs every point once, in the point's own
        run directory: the program is :data:`WANDB_PROGRAM`, which rebuilds the point from
        ``sweep_file`` and the agent's arguments. One grid: its keys are the sweep's parameters. A union
        of grids: one sweep over the point index (``point``), or with ``split`` one sweep per grid."""
        command = ["${env}", "${interpreter}", "${program}", str(sweep_file)]
        if nproc > 1:
            command.append(f"--nproc={nproc}")
        command.append("${args}")
        metric = {"name": wandb_metric_name(self.metric), "goal": self.require_goal()}

        def definition(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
            return {
                "program": WANDB_PROGRAM,
                "method": "grid",
                "name": name,
                "description": description,
                "metric": metric,
                "parameters": parameters,
                "command": command,
            }

        if len(self.grids) == 1 or split:
            width = max(2, len(str(len(self.grids))))
            out = []
            for i, grid in enumerate(self.grids, 1):
                n = len(list(itertools.product(*grid.values())))
                name = self.out_dir.name if len(self.grids) == 1 else f"{self.out_dir.name}.{i:0{width}d}"
                where = "" if len(self.grids) == 1 else f", grid {i} of {len(self.grids)}"
                params = {k: {"values": v} for k, v in grid.items()}
                out.append(definition(name, f"{sweep_file}{where}: {n} points", params))
            return out
        n = len(self.runs())
        return [
            definition(
                self.out_dir.name,
                f"{sweep_file}: its {n} points by index (scripts/sweep.py {sweep_file} --dry-run lists them)",
                {"point": {"values": list(range(n))}},
            )
        ]


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


def finished_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """``(config, every record of metrics.jsonl)`` of a run that evaluated at its last step
    (``max_steps``); None for a directory without both files or a run not finished."""
    run_dir = Path(run_dir)
    cfg_path, met_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not cfg_path.is_file() or not met_path.is_file():
        return None
    cfg = yaml.safe_load(cfg_path.read_text())
    recs = [json.loads(x) for x in met_path.read_text().splitlines() if x.strip()]
    if not any(r["kind"] == "eval" and r["step"] == cfg["max_steps"] for r in recs):
        return None
    return cfg, recs


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


def exit_status(result: str) -> int:
    """A point's exit status from :meth:`Sweep.run_point`'s result: 0 done or skipped, the trainer's
    status if it failed (128 + N if signal N ended it, as a shell reports it)."""
    if not result.startswith("failed"):
        return 0
    code = int(result.removeprefix("failed (").removesuffix(")"))
    return code if code > 0 else 128 - code


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


def subprocess_runner(
    sweep: Sweep, nproc: int = 1, program: str | Path = "train.py", echo: bool = False
) -> Callable[[Run], int]:
    """A runner that launches the point's training command (:meth:`Sweep.command`) in the current
    directory and appends its output to ``run_dir/train.log`` (with ``echo``, to stdout as well: a job
    array's log, the wandb agent's console). SIGTERM and SIGINT reach the trainer (a wandb agent
    stopping a run signals its program only)."""

    def run(r: Run) -> int:
        r.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = sweep.command(r, nproc, program=program)
        with (r.run_dir / "train.log").open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT)
            main_thread = threading.current_thread() is threading.main_thread()
            forward = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT) if main_thread}
            for sig in forward:
                signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
            try:
                if echo:
                    assert proc.stdout is not None
                    for line in proc.stdout:
                        log.write(line)
                        log.flush()
                        sys.stdout.buffer.write(line)
                        sys.stdout.flush()
                return proc.wait()
            finally:
                for sig, handler in forward.items():
                    signal.signal(sig, handler)

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
