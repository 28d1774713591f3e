"""Text + audio cross entropy over moshi's valid positions, normalised over the global batch.

moshi's ``LMOutput`` holds NaN at positions cut off by the codebook delays and at ``-1`` (zero-token)
targets; ``out.mask`` / ``out.text_mask`` mark the valid ones, and logits are always indexed with
them (``loss * mask`` over all positions would turn NaN * 0 into NaN).

Each target has a weight (moshi-finetune's options: the first, semantic, codebook's weight is
multiplied by ``first_codebook_weight``; PAD / end-of-padding text targets get
``text_padding_weight``). The objective is ``text_weight * sum(w * ce_text) / sum(w_text) +
audio_weight * sum(w * ce_audio) / sum(w_audio)`` with the sums taken over the *global* batch (all
micro-batches on all ranks): :func:`target_weights` computes the weights from the codes alone, before
the forward pass, so the trainer can all-reduce the normalisers first. The result does not depend on
how the global batch is split over processes and accumulation steps. Unweighted NLL sums are returned
too: perplexity is ``exp`` of their per-token mean (in nats).

:func:`loss_weights` and :func:`training_loss` apply the ``loss`` section of a training config
(``finetune.args.LossArgs``) to a moshi ``LMModel``: what the trainer, the evaluation and the
benchmarks call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from ..args import LossArgs


@dataclass
class LossParts:
    loss: torch.Tensor  # the weighted objective of this micro-batch (differentiable)
    text_weighted_sum: torch.Tensor  # sum(w * ce) over text / audio targets (detached): with the weight
    audio_weighted_sum: torch.Tensor  # sums, the objective over any set of batches (eval)
    text_nll_sum: torch.Tensor  # unweighted sums and counts, for logging and perplexity
    text_count: torch.Tensor
    audio_nll_sum: torch.Tensor
    audio_count: torch.Tensor


def target_weights(
    codes: torch.Tensor,
    delays: list[int],
    dep_q: int,
    *,
    text_padding_ids: tuple[int, ...] = (3, 0),
    first_codebook_weight: float = 1.0,
    text_padding_weight: float = 0.5,
    zero_token_id: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target weights ``([B, 1, T], [B, dep_q, T])``, zero where moshi's masks are False."""
    B, K, T = codes.shape
    t = torch.arange(T, device=codes.device)
    text = codes[:, :1]
    tw = ((t < T - delays[0]) & (text != zero_token_id)).float()
    for pad in text_padding_ids:
        tw = torch.where(text == pad, tw * text_padding_weight, tw)
    audio = codes[:, 1 : 1 + dep_q]
    d = torch.tensor(delays[1 : 1 + dep_q], device=codes.device).view(1, dep_q, 1)
    aw = ((t < T - d) & (audio != zero_token_id)).float()
    aw[:, 0] *= first_codebook_weight
    return tw, aw


def compute_loss(
    out,
    codes: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    *,
    norms: tuple[float, float] | None = None,
    text_weight: float = 1.0,
    audio_weight: float = 1.0,
) -> LossParts:
    """Loss of a moshi ``LMOutput`` against ``codes [B, 1 + n_q, T]``.

    ``norms``: the (text, audio) weight sums to divide by; default: this batch's own sums.
    """
    dep_q = out.logits.shape[1]
    tw, aw = weights
    parts = []
    for logits, mask, targets, w in (
        (out.text_logits, out.text_mask, codes[:, :1], tw),
        (out.logits, out.mask, codes[:, 1 : 1 + dep_q], aw),
    ):
        ce = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
        parts.append(
            ((ce * w[mask]).sum(), ce.detach().sum(), torch.tensor(float(ce.numel()), device=ce.device))
        )
    (t_num, t_sum, t_n), (a_num, a_sum, a_n) = parts
    t_den, a_den = norms if norms is not None else (tw.sum(), aw.sum())
    loss = text_weight * t_num / max(float(t_den), 1e-8) + audio_weight * a_num / max(float(a_den), 1e-8)
    return LossParts(loss, t_num.detach(), a_num.detach(), t_sum, t_n, a_sum, a_n)


def loss_weights(opts: LossArgs, model, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`target_weights` of ``codes`` for moshi ``model`` (its delays and special tokens) under
    the ``loss`` options ``opts``."""
    return target_weights(
        codes,
        list(model.delays),
        model.dep_q,
        text_padding_ids=(model.text_padding_token_id, model.end_of_text_padding_id),
        first_codebook_weight=opts.first_codebook_weight,
        text_padding_weight=opts.text_padding_weight,
        zero_token_id=model.zero_token_id,
    )


def training_loss(
    opts: LossArgs,
    out,
    codes: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    norms: tuple[float, float] | None = None,
) -> LossParts:
    """:func:`compute_loss` with the text / audio weights of the ``loss`` options ``opts``."""
    return compute_loss(
        out, codes, weights, norms=norms, text_weight=opts.text_weight, audio_weight=opts.audio_weight
    )
