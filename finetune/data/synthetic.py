"""Generated token sequences with learnable structure, for the CPU default and tests.

Each item is a Moshi token grid ``[1 + n_q, T]`` built from its index and a seed alone (so every rank
and every worker agrees on it): the text stream follows a per-sequence affine recurrence with pauses
(PAD tokens), and each audio codebook is a fixed function of the text token plus noise. A model
learns both quickly, so the loss visibly decreases within a couple of CPU minutes.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

# The held-out split of a generated task is the same generator with seed + this offset.
EVAL_SEED_OFFSET = 7919


class SyntheticCodes(Dataset):
    def __init__(
        self,
        num_items: int,
        num_frames: int,
        n_q: int,
        card: int,
        text_card: int,
        seed: int = 0,
        text_padding_id: int = 3,
        noise: float = 0.1,
    ) -> None:
        if num_items < 1 or num_frames < 1:
            raise ValueError(
                f"synthetic data needs num_items >= 1 and num_frames >= 1, got {num_items}, {num_frames}"
            )
        self.num_items, self.num_frames = num_items, num_frames
        self.n_q, self.card, self.text_card = n_q, card, text_card
        self.seed, self.pad, self.noise = seed, text_padding_id, noise

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        T, V = self.num_frames, self.text_card
        step = int(torch.randint(1, 7, (1,), generator=g))
        start = int(torch.randint(4, V, (1,), generator=g))
        text = (start + step * torch.arange(T)) % (V - 4) + 4  # ids 4.. avoid the special ids 0..3
        pauses = torch.rand(T, generator=g) < 0.2
        text = torch.where(pauses, torch.full_like(text, self.pad), text)
        audio = (text[None, :] * (torch.arange(self.n_q)[:, None] + 3) + 11) % self.card  # [n_q, T]
        noisy = torch.rand(self.n_q, T, generator=g) < self.noise
        audio = torch.where(noisy, torch.randint(0, self.card, (self.n_q, T), generator=g), audio)
        return torch.cat([text[None], audio], 0).long()  # [1 + n_q, T]


def synthetic_datasets(cfg, model) -> tuple[SyntheticCodes, SyntheticCodes]:
    """Train and eval sets of a training config (``data.synthetic``) shaped for moshi ``model``."""
    common = dict(
        num_frames=cfg.data.num_frames,
        n_q=model.n_q,
        card=model.card,
        text_card=model.text_card,
        text_padding_id=model.text_padding_token_id,
    )
    train = SyntheticCodes(cfg.data.synthetic.num_train, seed=cfg.seed, **common)
    evals = SyntheticCodes(cfg.data.synthetic.num_eval, seed=cfg.seed + EVAL_SEED_OFFSET, **common)
    return train, evals
