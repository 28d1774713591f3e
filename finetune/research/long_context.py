"""Long-context evaluation: loss as a function of position, and recall as a function of distance.

For each run (a checkpoint, rebuilt as moshi loads it plus the TTT file), teacher-forced forward
passes over an eval set give, per position bucket, the mean text and audio cross entropy (nats) over
valid targets. On the recall task (``finetune.data.recall``) they also give the value accuracy and
NLL per distance bucket. A TTT run can be evaluated a second time with its fast-weight updates
turned off (``moshi_ttt.set_ttt_updates``: the same weights without test-time training), side by side.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from moshi_ttt import set_ttt_updates

from ..data.audio import FRAME_RATE
from ..data.build import build_datasets
from ..data.recall import attention_window, receptive_field
from ..serving.inference import LoadedModel, load_checkpoint_model
from ..training.evaluation import ERROR_KINDS, answer_kind, has_queries, recall_scores


@dataclass
class EvalResult:
    name: str
    position_edges: list[int]  # bucket b covers positions [edges[b], edges[b+1])
    text_loss: list[float | None]
    audio_loss: list[float | None]
    distance_edges: list[int] = field(default_factory=list)
    recall_acc: list[float | None] = field(default_factory=list)
    recall_nll: list[float | None] = field(default_factory=list)
    recall_count: list[int] = field(default_factory=list)
    # Far queries by what was predicted (ERROR_KINDS): shares of the far queries, and their number.
    far_answers: dict[str, float] = field(default_factory=dict)
    far_count: int = 0
    # Over every valid position: the text and audio NLL of the whole eval set (nats).
    text_nll: float | None = None
    audio_nll: float | None = None


@torch.no_grad()
def stream_text_logits(lm, codes: torch.Tensor, *, free_text: bool = True) -> torch.Tensor:
    """Text logits ``[B, T, V]`` of ``codes [B, K, T]`` computed step by step in streaming mode, the
    audio codebooks teacher-forced. With ``free_text`` the text stream fed back at each step is
    Moshi's own greedy prediction of the step before, not the data's: recall is then scored on what
    Moshi itself writes (e.g. the echo of a fact it heard). ``free_text=False`` reproduces the
    training forward's text logits (LMModel.forward: delays, initial token)."""
    B, K, T = codes.shape
    # LMModel.forward's input: codebook k delayed by delays[k] (the initial token before), shifted by one
    # step behind the initial token.
    x = torch.empty(B, K, T + 1, dtype=codes.dtype, device=codes.device)
    x[:, 0] = lm.text_initial_token_id
    x[:, 1:] = lm.initial_token_id
    for k, d in enumerate(lm.delays):
        x[:, k, 1 + d :] = codes[:, k, : T - d]
    out = []
    with lm.streaming(B):
        for t in range(T):
            step = x[:, :, t : t + 1].clone()
            if free_text and t > 0:
                step[:, 0, 0] = out[-1].argmax(-1)
            out.append(lm.forward_text(step)[1][:, 0, -1].float())  # [B, V]
    return torch.stack(out, 1)


def _buckets(values: np.ndarray, edges: list[int]) -> np.ndarray:
    return np.clip(np.searchsorted(np.array(edges), values, side="right") - 1, 0, len(edges) - 2)


@torch.no_grad()
def evaluate_model(
    name: str,
    lm,
    dataset,
    *,
    batch_size: int = 8,
    max_items: int | None = None,
    bucket: int = 16,
    distance_edges: list[int] | None = None,
    free_text: bool = False,
) -> EvalResult:
    lm.eval()
    n = len(dataset) if max_items is None else min(max_items, len(dataset))
    sums_t = sums_a = None
    rec = None
    T = None
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        items = [dataset[i] for i in idx]
        keep = [(i, x) for i, x in zip(idx, items) if x is not None]
        if not keep:
            continue
        idx, items = [i for i, _ in keep], [x for _, x in keep]
        codes = torch.stack(items)
        B, K, T = codes.shape
        if sums_t is None:
            edges = list(range(0, T, bucket)) + [T]
            sums_t, sums_a = np.zeros((2, len(edges) - 1)), np.zeros((2, len(edges) - 1))
        out = lm(codes)
        pos_b = _buckets(np.arange(T), edges)
        # Text: [B, T] CE at valid positions.
        tl = stream_text_logits(lm, codes) if free_text else out.text_logits[:, 0].float()
        tmask = out.text_mask[:, 0]
        ce_t = torch.zeros(B, T)
        ce_t[tmask] = F.cross_entropy(tl[tmask], codes[:, 0][tmask], reduction="none")
        # Audio: mean over the valid predicted codebooks at each position.
        al = out.logits.float()
        amask = out.mask
        dep_q = al.shape[1]
        ce_a = torch.zeros(B, dep_q, T)
        ce_a[amask] = F.cross_entropy(al[amask], codes[:, 1 : 1 + dep_q][amask], reduction="none")
        for b_idx in range(len(edges) - 1):
            sel = torch.from_numpy(pos_b == b_idx)
            sums_t[0, b_idx] += ce_t[:, sel][tmask[:, sel]].sum().item()
            sums_t[1, b_idx] += tmask[:, sel].sum().item()
            sums_a[0, b_idx] += ce_a[:, :, sel][amask[:, :, sel]].sum().item()
            sums_a[1, b_idx] += amask[:, :, sel].sum().item()
        if has_queries(dataset) and distance_edges:
            if rec is None:
                rec = np.zeros((3, len(distance_edges) - 1))  # per distance bucket: hits, NLL, count
                kinds = dict.fromkeys(ERROR_KINDS, 0)
            for q, hit, nll in recall_scores(tl, dataset, idx):
                d = int(_buckets(np.array([q.distance]), distance_edges)[0])
                rec[:, d] += (hit, nll, 1)
            values = range(dataset.first_value, dataset.first_value + dataset.num_values)
            for b, i in enumerate(idx):
                qs = dataset.queries(i)
                for q in (q for q in qs if q.far):
                    kinds[answer_kind(int(tl[b, q.value_pos].argmax()), q, qs, values)] += 1
    if sums_t is None:
        raise ValueError("the eval set has no valid item")

    def ratio(s):
        return [float(a / c) if c > 0 else None for a, c in zip(s[0], s[1])]

    res = EvalResult(name, edges, ratio(sums_t), ratio(sums_a))
    res.text_nll = float(sums_t[0].sum() / sums_t[1].sum()) if sums_t[1].sum() > 0 else None
    res.audio_nll = float(sums_a[0].sum() / sums_a[1].sum()) if sums_a[1].sum() > 0 else None
    if rec is not None:
        res.distance_edges = list(distance_edges)
        res.recall_acc = [float(a / c) if c else None for a, c in zip(rec[0], rec[2])]
        res.recall_nll = [float(a / c) if c else None for a, c in zip(rec[1], rec[2])]
        res.recall_count = [int(c) for c in rec[2]]
        res.far_count = sum(kinds.values())
        res.far_answers = {k: v / res.far_count for k, v in kinds.items()} if res.far_count else {}
    return res


def eval_dataset_for(loaded: LoadedModel, num_items: int | None = None):
    """The eval split of the run's own training data (recall, synthetic or manifest)."""
    _, evals = build_datasets(loaded.cfg, loaded.lm)
    if evals is None:
        raise ValueError(f"{loaded.checkpoint}: the run has no eval data (data.eval); pass --eval-config")
    return evals


def context_of(lm) -> tuple[int, int]:
    """(attention window, receptive field of the stacked layers) in steps; 10**9 stands for unlimited."""
    return attention_window(lm) or 10**9, receptive_field(lm) or 10**9


def _eval_data_config(
    loaded: LoadedModel, eval_config: str | Path | None, data_overrides: dict[str, Any] | None
):
    """The config whose ``data`` section is the eval set: ``eval_config`` (or the run's own config) with
    ``data_overrides`` (``data.*`` keys only, checked by :func:`evaluate_runs`: the model is the
    checkpoint's)."""
    from ..args import load_config
    from ..schema import apply_overrides, from_dict, to_dict

    if eval_config is not None:
        return load_config(eval_config, data_overrides)
    cfg = from_dict(type(loaded.cfg), apply_overrides(to_dict(loaded.cfg), data_overrides or {}))
    cfg.check()
    return cfg


def evaluate_runs(
    runs: list[str | Path],
    *,
    eval_config: str | Path | None = None,
    frozen_too: bool = True,
    max_items: int | None = 64,
    batch_size: int = 8,
    bucket: int | None = None,
    free_text: bool = False,
    data_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every run on one eval set (the first run's own, or ``eval_config``'s, with ``data_overrides``:
    ``{"data.eval": ..., ...}`` applied to it), TTT runs also with their updates off; with
    ``free_text`` every run once more on its own greedy text stream (:func:`stream_text_logits`)."""
    bad = [k for k in data_overrides or {} if not k.startswith("data.")]
    if bad:  # before any checkpoint is loaded
        raise ValueError(
            f"only data.* settings choose the eval set; not {', '.join(bad)} "
            "(eval set overrides are --data.KEY=VALUE)"
        )
    results: list[EvalResult] = []
    info: dict[str, Any] = {}
    dataset = None
    for run in runs:
        loaded = load_checkpoint_model(run, with_codec=False)
        if dataset is None:
            if eval_config is not None or data_overrides:
                _, dataset = build_datasets(_eval_data_config(loaded, eval_config, data_overrides), loaded.lm)
            else:
                dataset = eval_dataset_for(loaded)
            ctx, receptive = context_of(loaded.lm)
            info = {
                "context": ctx,
                "receptive_field": receptive,
                "eval_items": min(len(dataset), max_items or 10**9),
            }
        b = bucket or max(4, ctx // 2 if ctx < 10**9 else 64)
        d_edges = [0, ctx, receptive + 1, 10**9] if has_queries(dataset) else None
        name = Path(run).name if (Path(run) / "checkpoints").is_dir() else str(Path(run).parent.parent.name)
        kw = dict(batch_size=batch_size, max_items=max_items, bucket=b, distance_edges=d_edges)
        tag = " (TTT)" if loaded.ttt else ""
        results.append(evaluate_model(name + tag, loaded.lm, dataset, **kw))
        if free_text:
            results.append(
                evaluate_model(name + tag + " (own text)", loaded.lm, dataset, free_text=True, **kw)
            )
        if loaded.ttt and frozen_too:
            set_ttt_updates(loaded.lm, False)
            results.append(evaluate_model(name + " (TTT updates off)", loaded.lm, dataset, **kw))
            if free_text:
                results.append(
                    evaluate_model(
                        name + " (TTT updates off, own text)", loaded.lm, dataset, free_text=True, **kw
                    )
                )
    return {"info": info, "results": [r.__dict__ for r in results]}


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def to_markdown(report: dict[str, Any]) -> str:
    info, res = report["info"], report["results"]
    lines = [
        f"Attention window: {info['context']} steps; stacked receptive field: {info['receptive_field']} steps; "
        f"{info['eval_items']} eval sequences.",
        "",
        "| run | text NLL | audio NLL |",
        "|---|---|---|",
        *(f"| {r['name']} | {_fmt(r.get('text_nll'))} | {_fmt(r.get('audio_nll'))} |" for r in res),
        "",
    ]
    if res and res[0]["recall_acc"]:
        e = res[0]["distance_edges"]
        labels = [f"[{a}, {b})" if b < 10**9 else f">= {a}" for a, b in zip(e[:-1], e[1:])]
        lines += ["Recall: value accuracy (NLL) by distance from the definition, in steps", ""]
        lines += ["| run | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for r in res:
            cells = [
                f"{_fmt(a)} ({_fmt(n)}, n={c})"
                for a, n, c in zip(r["recall_acc"], r["recall_nll"], r["recall_count"])
            ]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        lines.append("")
        if any(r.get("far_answers") for r in res):
            lines += ["Far queries: share of the answers of each kind", ""]
            lines += ["| run | " + " | ".join(ERROR_KINDS) + " |", "|---|" + "---|" * len(ERROR_KINDS)]
            for r in res:
                if r.get("far_answers"):
                    cells = [_fmt(r["far_answers"][k]) for k in ERROR_KINDS]
                    lines.append(f"| {r['name']} (n={r['far_count']}) | " + " | ".join(cells) + " |")
            lines.append("")
    e = res[0]["position_edges"] if res else []
    labels = [f"{a}-{b - 1}" for a, b in zip(e[:-1], e[1:])]
    for key, title in (
        ("text_loss", "Text cross entropy (nats) by position"),
        ("audio_loss", "Audio cross entropy (nats, mean over codebooks) by position"),
    ):
        lines += [title, "", "| run | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for r in res:
            lines.append(f"| {r['name']} | " + " | ".join(_fmt(v) for v in r[key]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info, res = report["info"], report["results"]
    has_recall = bool(res and res[0]["recall_acc"])
    fig, axes = plt.subplots(1, 2 if has_recall else 1, figsize=(12 if has_recall else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    for r in res:
        e = r["position_edges"]
        centers = [(a + b - 1) / 2 for a, b in zip(e[:-1], e[1:])]
        ax.plot(
            centers, [v if v is not None else np.nan for v in r["text_loss"]], marker="o", label=r["name"]
        )
    for x, label in (
        (info["context"], "attention window"),
        (info["receptive_field"], "stacked receptive field"),
    ):
        if x < 10**9:
            ax.axvline(x, color="gray", ls="--" if "window" in label else ":", lw=1)
            ax.text(x, ax.get_ylim()[1], f" {label}", fontsize=8, va="top", color="gray")
    ax.set_xlabel(f"position (steps, {FRAME_RATE:g} per second)")
    ax.set_ylabel("text cross entropy (nats)")
    ax.set_title("Text loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_recall:
        ax = axes[0, 1]
        e = res[0]["distance_edges"]
        labels = [f"[{a},{b})" if b < 10**9 else f">={a}" for a, b in zip(e[:-1], e[1:])]
        width = 0.8 / len(res)
        for k, r in enumerate(res):
            xs = np.arange(len(labels)) + k * width
            ax.bar(xs, [v if v is not None else 0 for v in r["recall_acc"]], width=width, label=r["name"])
        ax.set_xticks(np.arange(len(labels)) + width * (len(res) - 1) / 2, labels)
        ax.set_xlabel("distance from definition (steps)")
        ax.set_ylabel("value accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("Recall by distance")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / "long_context.json"
    j.write_text(json.dumps(report, indent=1))
    md = out_dir / "long_context.md"
    md.write_text(to_markdown(report))
    return [j, md, plot(report, out_dir / "long_context.png")]
