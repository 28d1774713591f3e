"""Evaluation on held-out data: the training objective, NLL and perplexity, and recall accuracy.

:func:`evaluate` is what the trainer logs every ``eval.interval`` steps; :func:`recall_scores` scores
the queries of the recall task (``finetune.data.recall``) for it and for the long-context evaluation
(``finetune.research.long_context``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.nn import functional as F

from ..args import TrainConfig
from ..data import eval_batches
from ..data.loader import eval_plan
from ..data.recall import Query
from . import distributed as D
from .loss import loss_weights, training_loss


def has_queries(dataset) -> bool:
    """Whether ``dataset`` is a recall task (its items have queries to score)."""
    return hasattr(dataset, "queries")


# What a far query's top prediction is: its value, the value of another definition of the same
# sequence (the fast weight holds the values but not which key they belong to), or neither.
ERROR_KINDS = ("right", "another value of the sequence", "a value not in the sequence", "not a value")


def answer_kind(pred: int, query, queries: list, values: range) -> str:
    """Which of :data:`ERROR_KINDS` the prediction ``pred`` for ``query`` is (``queries``: all of the
    sequence's queries; ``values``: the task's value token ids)."""
    if pred == query.value:
        return ERROR_KINDS[0]
    if pred in {q.value for q in queries if q is not query}:
        return ERROR_KINDS[1]
    return ERROR_KINDS[2] if pred in values else ERROR_KINDS[3]


def crosses_chunk(query: Query, chunk_size: int) -> bool:
    """Whether ``query``'s definition lies in an earlier TTT chunk than the query itself (chunks
    aligned to the sequence start; both placed at their value's step). Only such a query can be
    answered by the fast weight, and only its loss reaches the fast weight's update in training."""
    return (query.value_pos - query.distance) // chunk_size < query.value_pos // chunk_size


def recall_scores(
    text_logits: torch.Tensor, dataset, indices: list[int]
) -> Iterator[tuple[Query, float, float]]:
    """``(query, hit, nll)`` for every query of the items ``indices`` of recall ``dataset``, from
    their text logits ``[B, T, V]`` (batch row ``b`` is item ``indices[b]``): ``hit`` is 1.0 when the
    value is the top prediction, ``nll`` its cross entropy (nats)."""
    for b, i in enumerate(indices):
        for q in dataset.queries(i):
            lg = text_logits[b, q.value_pos]  # [V]
            hit = float(lg.argmax() == q.value)
            yield q, hit, float(F.cross_entropy(lg[None], torch.tensor([q.value], device=lg.device)))


@torch.no_grad()
def evaluate(model, base, dataset, cfg: TrainConfig, dist_info: D.DistInfo) -> dict[str, float]:
    """Held-out loss and unweighted NLL / perplexity (exp of the per-token NLL in nats).

    ``loss`` is the training objective over the whole evaluation set (every batch, every process),
    normalised by its total target weights like the NLLs by their token counts, so it does not depend
    on how the set is split into batches and processes. ``base`` is ``model`` without its DDP / FSDP
    wrapper. On a recall task, :func:`recall_metrics` too."""
    model.eval()
    # text: weighted CE, weights, NLL, count; audio: the same
    sums = torch.zeros(8, device=dist_info.device, dtype=torch.float64)
    for codes in eval_batches(
        dataset, cfg.batch_size, cfg.eval.num_batches, dist_info.rank, dist_info.world_size
    ):
        codes = codes.to(dist_info.device)
        with D.autocast(cfg, dist_info):
            out = model(codes)
        tw, aw = loss_weights(cfg.loss, base, codes)
        p = training_loss(cfg.loss, out, codes, (tw, aw))
        sums += torch.stack(
            [p.text_weighted_sum, tw.sum(), p.text_nll_sum, p.text_count]
            + [p.audio_weighted_sum, aw.sum(), p.audio_nll_sum, p.audio_count]
        ).double()
    sums = D.all_reduce_sum(sums)
    recall = recall_metrics(model, dataset, cfg, dist_info) if has_queries(dataset) else {}
    model.train()
    loss = cfg.loss.text_weight * sums[0] / sums[1].clamp_min(1e-8)
    loss = loss + cfg.loss.audio_weight * sums[4] / sums[5].clamp_min(1e-8)
    text_nll = (sums[2] / sums[3]).item()
    audio_nll = (sums[6] / sums[7]).item()
    nll = ((sums[2] + sums[6]) / (sums[3] + sums[7])).item()
    return {
        "loss": loss.item(),
        "text_nll": text_nll,
        "audio_nll": audio_nll,
        "text_ppl": math.exp(min(text_nll, 50)),
        "audio_ppl": math.exp(min(audio_nll, 50)),
        "ppl": math.exp(min(nll, 50)),
        **recall,
    }


@torch.no_grad()
def recall_metrics(model, dataset, cfg: TrainConfig, dist_info: D.DistInfo) -> dict[str, float]:
    """Value accuracy and NLL at recall queries, within (near) and beyond (far) the attention window.

    Also ``recall_far_other``: the share of far queries answered with another value of the same
    sequence (a memory that holds the values but has not bound them to their keys: the half-right
    plateau); and with TTT on, near accuracy split by whether the definition lies in an earlier
    chunk than the query (``recall_acc_near_cross``, reachable by the fast weight) or in the same
    chunk (``recall_acc_near_within``), with ``recall_near_cross_share``, the share of the former."""
    plan = eval_plan(len(dataset), cfg.batch_size, dist_info.rank, dist_info.world_size)
    n = (
        min(cfg.eval.num_batches, plan.batches_per_epoch)
        if cfg.eval.num_batches > 0
        else plan.batches_per_epoch
    )
    chunk = cfg.ttt.chunk_size if cfg.ttt.enabled else None
    values = range(dataset.first_value, dataset.first_value + dataset.num_values)
    # near: hits, nll, count; far: hits, nll, count; far answered with another value; near across
    # chunks: hits, count; near within a chunk: hits, count
    sums = torch.zeros(11, dtype=torch.float64)
    for step in range(n):
        idx = plan.indices(0, step)
        codes = torch.stack([dataset[i] for i in idx]).to(dist_info.device)
        with D.autocast(cfg, dist_info):
            logits = model(codes).text_logits[:, 0].float()  # [B, T, V]
        for b, i in enumerate(idx):
            queries = dataset.queries(i)
            for q in queries:
                lg = logits[b, q.value_pos]  # [V]
                pred = int(lg.argmax())
                hit = float(pred == q.value)
                nll = float(F.cross_entropy(lg[None], torch.tensor([q.value], device=lg.device)))
                k = 3 if q.far else 0
                sums[k : k + 3] += torch.tensor([hit, nll, 1.0], dtype=torch.float64)
                if q.far:
                    sums[6] += answer_kind(pred, q, queries, values) == ERROR_KINDS[1]
                elif chunk is not None:
                    k = 7 if crosses_chunk(q, chunk) else 9
                    sums[k : k + 2] += torch.tensor([hit, 1.0], dtype=torch.float64)
    sums = D.all_reduce_sum(sums.to(dist_info.device)).cpu()
    out = {}
    for k, name in ((0, "near"), (3, "far")):
        if sums[k + 2] > 0:
            out[f"recall_acc_{name}"] = (sums[k] / sums[k + 2]).item()
            out[f"recall_nll_{name}"] = (sums[k + 1] / sums[k + 2]).item()
    if sums[5] > 0:
        out["recall_far_other"] = (sums[6] / sums[5]).item()
    if chunk is not None and sums[2] > 0:
        out["recall_near_cross_share"] = (sums[8] / sums[2]).item()
        for k, name in ((7, "cross"), (9, "within")):
            if sums[k + 1] > 0:
                out[f"recall_acc_near_{name}"] = (sums[k] / sums[k + 1]).item()
    return out
