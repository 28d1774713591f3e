"""Text + audio cross entropy over moshi's valid positions.

moshi's ``LMOutput`` holds NaN at positions cut off by the codebook delays and at ``-1`` (zero-token)
targets; ``out.mask`` / ``out.text_mask`` mark the valid ones. Logits are always indexed with the
mask (``loss * mask`` over all positions would turn NaN * 0 into NaN).

The training loss is ``text_weight * text_ce + audio_weight * audio_ce`` where each CE is a weighted
mean (moshi-finetune's options: the first, semantic, codebook's weight is multiplied by
``first_codebook_weight``; PAD / end-of-padding text targets get ``text_padding_weight``). The
unweighted per-token NLLs are returned too: they are what perplexity (``exp``) is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class LossParts:
    loss: torch.Tensor  # the weighted training objective (differentiable)
    text_nll_sum: torch.Tensor  # unweighted sums and counts, for logging and perplexity
    text_count: torch.Tensor
    audio_nll_sum: torch.Tensor
    audio_count: torch.Tensor


def _weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    weighted = (ce * weights).sum() / weights.sum().clamp_min(1e-8)
    return weighted, ce.detach().sum(), torch.tensor(ce.numel(), device=ce.device, dtype=torch.float32)


def compute_loss(
    out,
    codes: torch.Tensor,
    *,
    text_padding_ids: tuple[int, ...] = (3, 0),
    text_weight: float = 1.0,
    audio_weight: float = 1.0,
    first_codebook_weight: float = 1.0,
    text_padding_weight: float = 0.5,
) -> LossParts:
    """Loss of a moshi ``LMOutput`` against ``codes [B, 1 + n_q, T]`` (text stream first)."""
    dep_q = out.logits.shape[1]
    text_targets = codes[:, :1]  # [B, 1, T]
    audio_targets = codes[:, 1 : 1 + dep_q]  # [B, dep_q, T]

    tmask = out.text_mask
    t_tgt = text_targets[tmask]
    t_w = torch.ones_like(t_tgt, dtype=torch.float32)
    for pad in text_padding_ids:
        t_w = torch.where(t_tgt == pad, t_w * text_padding_weight, t_w)
    text_loss, text_sum, text_n = _weighted_ce(out.text_logits[tmask], t_tgt, t_w)

    amask = out.mask
    a_tgt = audio_targets[amask]
    a_w = torch.ones_like(a_tgt, dtype=torch.float32)
    codebook = torch.arange(dep_q, device=codes.device).view(1, dep_q, 1).expand_as(amask)[amask]
    a_w = torch.where(codebook == 0, a_w * first_codebook_weight, a_w)
    audio_loss, audio_sum, audio_n = _weighted_ce(out.logits[amask], a_tgt, a_w)

    loss = text_weight * text_loss + audio_weight * audio_loss
    return LossParts(loss, text_sum, text_n, audio_sum, audio_n)
